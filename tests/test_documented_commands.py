"""Every command README.md and docs/*.md show runs, shrunk to CI size (issue 19 item 1).

The commands are read from the markdown itself (:mod:`tests.documented_commands`), so a new or
changed command in the docs is run as written, with only the shrink rules kept there applied.
``symensemble`` lines run in-process through click's CliRunner; ``torchrun`` lines run as
subprocesses with one process (two ranks: ``tests/test_distributed.py``, ``test_train_ddp.py``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from symensemble.cli import main

from . import documented_commands as docs
from .conftest import synthetic_cifar, write_tree

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A CIFAR-like class-folder tree, large enough for the shipped models' default calibration
    (2h = 32 images per member for paper_cnn) and a training epoch."""
    root = tmp_path_factory.mktemp("docs-data")
    return write_tree(root / "cifar", synthetic_cifar(n_train=300, n_test=40, n_val=10))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docs-cache")


@pytest.fixture(autouse=True)
def _isolated(cache, monkeypatch):
    monkeypatch.setenv("SYMENSEMBLE_CACHE", str(cache))  # decoded once for the module
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(docs.REPO)  # relative paths as the docs write them (every run gets --out)


def test_the_rules_match_the_docs():
    documented = {text for _, text in docs.documented_commands()}
    assert len(documented) >= 20  # the reader still finds the commands
    for text in docs.EXPAND:
        assert text in documented, f"EXPAND rule for a command no longer in the docs: {text}"
    for text in documented:  # pseudo-syntax needs an EXPAND rule, else it would not run
        if re.search(r"\[--|\s\|\s|\.\.\.", text):
            assert text in docs.EXPAND, f"documented command in pseudo-syntax without a rule: {text}"
    subs = {docs._subcommand(docs.split_torchrun(c)[1]) for c in docs.concrete_commands()}
    assert subs <= set(docs.SHRINK), f"no shrink rule for {sorted(subs - set(docs.SHRINK))}"
    for name in docs.RECIPE_SHRINK:
        assert any(name in c for c in docs.concrete_commands()), name


@pytest.mark.parametrize("command", docs.concrete_commands())
def test_documented_command_runs(command, tree, tmp_path):
    runner, args = docs.split_torchrun(command)
    args = docs.shrink_recipe(docs.shrink(args, tree, tmp_path / "out"), tmp_path)
    if any(a.startswith("robustbench:") for a in args):
        pytest.importorskip("robustbench")
    args = docs.weights_for(args, tmp_path)
    if runner:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        exe = str(Path(sys.executable).parent / "symensemble")
        proc = subprocess.run(["torchrun", *runner, "--", exe, *args], env=env,
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, f"{' '.join(args)}\n{result.output}"
    written = list((tmp_path / "out").rglob("*"))
    assert written, f"{command} wrote nothing"
