"""One output-folder policy for ``attack``, ``reproduce`` and ``q`` (issue 20): checked before any
work, a non-empty folder refused unless ``--overwrite`` (then replaced whole), never a partial
or mixed folder."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from symensemble.cli import main
from symensemble.commands import attack as attack_cmd
from symensemble.io import OutputError, check_out_dir, default_run_dir, staged_dir
from symensemble.robustness.records import EvaluationResult, Record, wilson_interval
from symensemble.robustness.report import files as report_files
from symensemble.robustness.report import write_results


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def no_evaluation(monkeypatch):
    """Fail the test if a command starts the (expensive) evaluation."""
    def forbidden(*args, **kw):
        raise AssertionError("the evaluation ran although --out was unusable")

    monkeypatch.setattr(attack_cmd, "_evaluate", forbidden)


def result() -> EvaluationResult:
    lo, hi = wilson_interval(6, 10)
    records = [Record("original", "whitebox", "fgsm", 0.0, 1, 0.6, lo, hi, 10, 6)]
    settings = {"transforms": ["original"], "num_members": [2], "ensemble_eps": [1.0],
                "threat": ["transfer"], "aggregate": "vote", "elapsed_s": 0.1}
    return EvaluationResult(settings, records)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc")
def test_attack_out_in_proc_fails_at_once(no_evaluation):
    res = run("attack", "--out", "/proc/x", "--n", "4", "--quiet")
    assert res.exit_code == 2, res.output
    assert "--out" in res.output and "cannot write the results to '/proc/x'" in res.output


def test_attack_refuses_a_non_empty_out_before_any_work(tmp_path, no_evaluation):
    out = tmp_path / "run"
    out.mkdir()
    (out / "robustbench_old.json").write_text("{}")
    res = run("attack", "--out", str(out), "--quiet")
    assert res.exit_code == 2 and "already holds files" in res.output and "--overwrite" in res.output
    assert [p.name for p in out.iterdir()] == ["robustbench_old.json"]  # untouched


def test_reproduce_and_q_check_out_first(tmp_path, no_evaluation):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run("reproduce", "paper_fig11_fgsm", "--out", str(blocker / "sub"), "--quiet")
    assert res.exit_code == 2 and "cannot write the results" in res.output
    res = run("q", "dynamics", "--steps", "100000000", "--out", str(blocker))  # would run for hours
    assert res.exit_code == 2 and "is a file" in res.output
    res = run("q", "teleport", "paper_cnn", "--flattest", "top", "--out", "/proc/x/new.safetensors")
    assert res.exit_code == 2 and "cannot write the results to '/proc/x/new.safetensors'" in res.output


def test_overwrite_replaces_the_folder_whole(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "robustbench_stale.json").write_text("{}")
    monkeypatch.setattr(attack_cmd, "_evaluate", lambda *a, **k: result())
    res = run("attack", "--out", str(out), "--overwrite", "--no-figures", "--quiet")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json", "table.md"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_a_failed_write_leaves_no_partial_folder_and_the_old_one_intact(tmp_path, monkeypatch):
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_text('{"old": true}')

    def broken(result):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_files, "_figures", broken)
    for out, overwrite in ((tmp_path / "new", False), (old, True)):
        with pytest.raises(OSError, match="No space"):
            write_results(result(), out, overwrite=overwrite)
    assert not (tmp_path / "new").exists()
    assert json.loads((old / "results.json").read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_check_out_dir_policy(tmp_path, monkeypatch):
    assert check_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # the check leaves nothing behind
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(OutputError, match="already holds files"):
        check_out_dir(full)
    check_out_dir(full, overwrite=True)
    monkeypatch.chdir(full)
    with pytest.raises(OutputError, match="current or home folder"):
        check_out_dir(full, overwrite=True)
    with pytest.raises(OutputError, match="current or home folder"):
        check_out_dir(tmp_path, overwrite=True)


def test_staged_dir_swaps_in_one_rename(tmp_path):
    out = tmp_path / "o"
    with staged_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not out.exists()  # nothing visible until the block finishes
    assert (out / "a.txt").read_text() == "1"
    with staged_dir(out) as tmp:
        (tmp / "b.txt").write_text("2")
    assert [p.name for p in out.iterdir()] == ["b.txt"]  # never two runs in one folder
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


def test_default_run_dirs_are_fresh(tmp_path):
    first = default_run_dir("attack", tmp_path)
    first.mkdir()
    second = default_run_dir("attack", tmp_path)
    assert second != first and not second.exists() and second.name.startswith(first.name)


def test_cli_errors_maps_library_errors_to_exit_code_2():
    from symensemble.checkpoint import CheckpointError
    from symensemble.commands.options import cli_errors
    from symensemble.data import DataError

    cases = [(CheckpointError("bad file"), "--checkpoint"), (DataError("no data"), "--data"),
             (OutputError("not writable"), "--out"), (ValueError("n must be positive"), None)]
    for err, hint in cases:
        with pytest.raises(click.UsageError) as info, cli_errors("recipe.toml: "):
            raise err
        assert info.value.exit_code == 2
        if hint:
            assert info.value.param_hint == hint
        else:
            assert str(info.value) == "recipe.toml: n must be positive"
    with pytest.raises(TypeError), cli_errors():  # bugs keep their traceback
        raise TypeError("a genuine bug")
