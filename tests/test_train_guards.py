"""Regression probes for issue #20 (training, resume, start-up): each failed on the code the
issue was filed against — a wrong summary after a collapse, a resume on other data, a corrupt
log crashing ``--resume``, ``--adv-*`` options silently ignored, a traceback on early Ctrl-C."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import symensemble as se
from symensemble.checkpoint import CheckpointError
from symensemble.cli import main
from symensemble.data import CIFAR10
from symensemble.training import loop as loop_mod
from symensemble.training.adversarial import RobustMonitor
from symensemble.training.loop import train
from symensemble.training.recipe import Recipe
from symensemble.training.state import log_path_for

from .conftest import make_split, write_image_tree, write_tiny_recipe

TINY = dict(hidden=4, model_kwargs={"channels": 2}, batch_size=16, eval_batch_size=64, lr=3e-3, val_size=0)


def _toml(tmp_path: Path, epochs: int = 1, extra: str = "") -> str:
    return str(write_tiny_recipe(tmp_path, epochs, extra))


def _interrupted_run(data: CIFAR10, out: Path) -> Recipe:
    """A 3-epoch run stopped (Ctrl-C) in epoch 2: ``out`` holds epoch 1, unfinished."""
    recipe = Recipe(**TINY, epochs=3)

    def stop(model, epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(recipe, data=data, out=out, device="cpu", progress=False, callbacks=[stop])
    assert se.load_model(out, with_info=True)[1]["epoch"] == 1
    return recipe


def test_collapse_summary_prints_the_kept_checkpoints_accuracies(tmp_path, isolated_cache, monkeypatch):
    curve = iter([0.30, 0.40, 0.35, 0.05])  # robust accuracy collapses in epoch 4; epoch 2 is kept
    monkeypatch.setattr(RobustMonitor, "accuracy", lambda self, model: next(curve))
    calls = {"n": 0}
    real = loop_mod.evaluate_global

    def distinct_accuracies(*args, **kwargs):  # val/test accuracy 0.0101, 0.0102, ... one per call
        calls["n"] += 1
        return {**real(*args, **kwargs), "accuracy": round(0.01 + calls["n"] / 10_000, 4)}

    monkeypatch.setattr(loop_mod, "evaluate_global", distinct_accuracies)
    data, out = write_image_tree(tmp_path / "data", per_class=4), tmp_path / "m.safetensors"
    recipe = _toml(tmp_path, 5, "[adversarial]\nval_size = 2\n")
    result = CliRunner().invoke(main, ["train", "--recipe", recipe, "--data", str(data), "--out", str(out),
                                       "--quiet", "--adv-method", "fgsm_rs"])
    assert result.exit_code == 0, result.output
    kept = se.load_model(out, with_info=True)[1]["metrics"]
    assert kept["epoch"] == 2 and (kept["val_accuracy"], kept["test_accuracy"]) == (0.0103, 0.0104)
    assert "test accuracy 0.0104  val accuracy 0.0103" in result.output  # not epoch 4's 0.0108/0.0107
    assert "weights of epoch 2 kept" in result.output


def test_resume_on_other_data_is_refused_like_another_recipe(tmp_path, tiny_cifar):
    out = tmp_path / "m.safetensors"
    recipe = _interrupted_run(tiny_cifar, out)
    other = CIFAR10(make_split(96, seed=7), tiny_cifar.val, tiny_cifar.test, tiny_cifar.classes, "folder:/x")
    with pytest.raises(CheckpointError, match=r"trained on data 'synthetic', but this run loads 'folder:/x'"
                                              r".*pass the --data of the interrupted run"):
        train(recipe, data=other, out=out, device="cpu", progress=False, resume=True)
    assert se.load_model(out, with_info=True)[1]["epoch"] == 1  # untouched
    resumed = train(recipe, data=tiny_cifar, out=out, device="cpu", progress=False, resume=True)
    assert [e["epoch"] for e in resumed.history] == [1, 2, 3]


def test_resume_with_a_corrupt_log_names_it_and_the_way_out(tmp_path, tiny_cifar):
    out = tmp_path / "m.safetensors"
    recipe = _interrupted_run(tiny_cifar, out)
    log = log_path_for(out)
    log.write_text('{"epochs": [{"epoch": 1, "train_lo')  # cut off mid-write by a full disk
    with pytest.raises(CheckpointError) as err:
        train(recipe, data=tiny_cifar, out=out, device="cpu", progress=False, resume=True)
    message = str(err.value)
    assert str(log) in message and "corrupt" in message and f"checkpoint {out} is intact" in message
    assert f"mv {log} {log}.broken" in message
    log.write_text(json.dumps({"epochs": "not a list"}))  # valid JSON of the wrong shape: the same answer
    with pytest.raises(CheckpointError, match="is corrupt or unreadable"):
        train(recipe, data=tiny_cifar, out=out, device="cpu", progress=False, resume=True)
    log.rename(log.with_name(log.name + ".broken"))  # the advertised recovery works
    resumed = train(recipe, data=tiny_cifar, out=out, device="cpu", progress=False, resume=True)
    assert [e["epoch"] for e in resumed.history] == [2, 3]


@pytest.mark.parametrize("option", [["--adv-eps", "4/255"], ["--adv-alpha", "1/255"], ["--adv-steps", "3"]])
def test_adv_options_without_adversarial_training_are_refused(tmp_path, isolated_cache, option):
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(main, ["train", "--recipe", _toml(tmp_path), "--out", str(out), "--quiet",
                                       *option])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert option[0] in result.output and "trains without it" in result.output
    assert "--adv-method fgsm_rs" in result.output and not out.exists()
    none = CliRunner().invoke(main, ["train", "--recipe", _toml(tmp_path), "--out", str(out), "--quiet",
                                     "--adv-method", "none", *option])
    assert none.exit_code == 2 and "method = 'none'" in none.output


def test_adv_method_alone_enables_adversarial_training_on_a_plain_recipe(tmp_path, isolated_cache):
    data, out = write_image_tree(tmp_path / "data", per_class=4), tmp_path / "m.safetensors"
    result = CliRunner().invoke(main, ["train", "--recipe", _toml(tmp_path), "--data", str(data), "--out",
                                       str(out), "--quiet", "--adv-method", "pgd", "--adv-eps", "4/255",
                                       "--adv-steps", "2"])
    assert result.exit_code == 0, result.output
    adversarial = se.load_model(out, with_info=True)[1]["recipe"]["adversarial"]
    assert (adversarial["method"], adversarial["steps"]) == ("pgd", 2)


def test_ctrl_c_during_start_up_prints_one_line_and_exits_130(tmp_path):
    # Ctrl-C arrives while the command line imports torch (the slow part of a cold start).
    code = (
        "import importlib.abc, sys\n"
        "class CtrlC(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'torch':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, CtrlC())\n"
        "sys.argv = ['symensemble', '--help']\n"
        "from symensemble.__main__ import run\n"
        "run()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == [
        "symensemble: interrupted (Ctrl-C) while starting up; nothing was run"]
    assert done.stdout == ""


def test_the_console_script_enters_through_the_guard():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"] == {"symensemble": "symensemble.__main__:run"}
