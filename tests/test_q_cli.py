"""``symensemble q ...`` through click's CliRunner, on tiny settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from symensemble.checkpoint import load_model, save_checkpoint
from symensemble.commands.q import command as q
from symensemble.diagnostics.inspection import head_q_summary
from symensemble.models import create_model

from .conftest import SHIPPED, real_cifar_root, synthetic_cifar, write_tree

pytestmark = pytest.mark.usefixtures("one_thread")


def run(args: list[str], ok: bool = True):
    result = CliRunner().invoke(q, args, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _checkpoint(tmp_path: Path, act: str = "leaky_relu", hidden: int = 4) -> Path:
    torch.manual_seed(0)
    model = create_model("paper_cnn", hidden=hidden, channels=2, act=act)
    return save_checkpoint(model, tmp_path / f"tiny-{act}.safetensors", metrics={"test_accuracy": 0.1})


def _outputs(folder: Path, name: str) -> dict:
    assert (folder / f"{name}.png").stat().st_size > 1000
    data = json.loads((folder / f"{name}.json").read_text())
    assert data["command"].startswith("symensemble q") and "git_revision" in data
    return data


def test_inspect(tmp_path):
    ckpt = _checkpoint(tmp_path)
    res = run(["inspect", str(ckpt), "--out", str(tmp_path / "o")])
    assert "group=T+(4), alpha=1" in res.output and "orbit dim=4" in res.output
    data = _outputs(tmp_path / "o", "tiny-leaky_relu")
    assert len(data["layers"][0]["per_unit"]) == 4
    # the same folder again: refused (issue 20: never two runs in one folder) unless --overwrite,
    # which replaces it whole (the first run's files are gone)
    again = ["inspect", str(_checkpoint(tmp_path, "sigmoid")), "--out", str(tmp_path / "o")]
    res = run(again, ok=False)
    assert res.exit_code == 2 and "already holds files" in res.output and "--overwrite" in res.output
    res = run([*again, "--overwrite"])
    assert "no continuous linear symmetry" in res.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["tiny-sigmoid.json", "tiny-sigmoid.png"]


def test_dynamics_distribution_convergence_hessian(tmp_path):
    out = tmp_path / "d"
    res = run(
        [
            "dynamics",
            "--activation",
            "identity",
            "--activation",
            "tanh",
            "--lr",
            "0.1",
            "--lr",
            "0.01",
            "--steps",
            "200",
            "--h",
            "8",
            "--out",
            str(out / "dyn"),
            "--quiet",
        ]
    )
    assert "Prop. E.1" in res.output and "holds=True" in res.output
    assert _outputs(out / "dyn", "dynamics")["checks"]["prop_e1_holds"]

    res = run(
        [
            "distribution",
            "--config",
            "10,20,10,identity",
            "--config",
            "10,10,10,relu",
            "--init",
            "xavier",
            "--samples",
            "100",
            "--out",
            str(out / "dist"),
            "--quiet",
        ]
    )
    assert "paper m-h = -10" in res.output
    assert len(_outputs(out / "dist", "distribution")["results"]) == 2

    res = run(
        [
            "convergence",
            "--kind",
            "radial",
            "--target",
            "0.5",
            "--target",
            "1",
            "--lr",
            "1e-4",
            "--steps",
            "3000",
            "--out",
            str(out / "rad"),
            "--quiet",
        ]
    )
    assert "smaller_Q_faster=True" in res.output
    res = run(
        [
            "convergence",
            "--kind",
            "elementwise",
            "--activation",
            "relu",
            "--target",
            "-1",
            "--target",
            "1",
            "--steps",
            "200",
            "--out",
            str(out / "conv"),
            "--quiet",
        ]
    )
    assert "[orbit]" in res.output
    assert _outputs(out / "conv", "convergence-elementwise")["results"]["relu"]["targets"] == [-1.0, 1.0]

    res = run(
        [
            "hessian",
            "--activation",
            "identity",
            "--init-std",
            "0.5",
            "--m",
            "3",
            "--n",
            "2",
            "--h",
            "5",
            "--lr",
            "0.05",
            "--steps",
            "2000",
            "--out",
            str(out / "hess"),
            "--quiet",
        ]
    )
    assert "near-zero 19/25 orbit dim 19 (formula 19)" in res.output
    assert _outputs(out / "hess", "hessian")["one_dimensional"]["max_abs_err"] < 1e-8


def test_bad_options_are_usage_errors(tmp_path):
    res = run(["distribution", "--config", "10,20,identity"], ok=False)
    assert res.exit_code == 2 and "expected m,h,n,activation" in res.output
    res = run(["dynamics", "--activation", "radial"], ok=False)
    assert res.exit_code == 2 and "'radial' is not one of" in res.output
    res = run(["convergence", "--kind", "radial", "--target", "-1", "--steps", "2"], ok=False)
    assert res.exit_code == 2 and "must be > 0" in res.output
    res = run(["dynamics", "--lr", "0"], ok=False)
    assert res.exit_code == 2


def test_teleport_without_data(tmp_path):
    ckpt = _checkpoint(tmp_path)
    # an interrupted training run: optimizer metadata, not complete (train --resume would continue it)
    save_checkpoint(
        load_model(ckpt), ckpt, metrics={"test_accuracy": 0.1},
        extra={"optimizer": {"kind": "adam"}, "complete": False, "note": "kept"},
    )
    out = tmp_path / "t" / "moved.safetensors"
    res = run(["teleport", str(ckpt), "--target", "-2.5", "--no-eval", "--out", str(out)])
    assert "target-total: Q total" in res.output
    moved, info = load_model(out, with_info=True)
    assert abs(head_q_summary(moved)["total"] + 2.5) < 1e-4
    assert info["extra"]["teleport"]["mode"] == "target-total"
    assert info["extra"]["complete"] is True and "optimizer" not in info["extra"]
    assert info["extra"]["note"] == "kept"
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["target_abs_error"] < 1e-4 and out.with_suffix(".png").exists()
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(moved(x), load_model(ckpt)(x), rtol=1e-5, atol=1e-5)
    run(["teleport", str(ckpt), "--unit-targets", "1,2,3,4", "--no-eval", "--out", str(out)])
    assert [round(v, 3) for v in head_q_summary(load_model(out))["per_unit"]] == [1, 2, 3, 4]


def test_teleport_bad_inputs(tmp_path):
    ckpt = _checkpoint(tmp_path)
    res = run(["teleport", str(ckpt), "--target", "1", "--flattest", "trace", "--no-eval"], ok=False)
    assert res.exit_code == 2 and "exactly one of" in res.output
    res = run(["teleport", str(ckpt), "--unit-targets", "1,2", "--no-eval"], ok=False)
    assert res.exit_code == 2 and "4 hidden units" in res.output
    res = run(["teleport", str(ckpt), "--unit-targets", "1,x,2,3", "--no-eval"], ok=False)
    assert res.exit_code == 2 and "comma-separated numbers" in res.output
    for act, match in (("tanh", "no continuous linear symmetry"), ("radial", "isometries")):
        res = run(["teleport", str(_checkpoint(tmp_path, act)), "--target", "1", "--no-eval"], ok=False)
        assert res.exit_code == 2 and match in res.output
    # an unreachable target: unit 0 has no incoming weights, so Q_0 < 0 for every scaling
    model = load_model(ckpt)
    with torch.no_grad():
        model.head.V.weight[0] = 0
        model.head.V.bias[0] = 0
    dead = save_checkpoint(model, tmp_path / "dead.safetensors")
    res = run(["teleport", str(dead), "--unit-targets", "1,1,1,1", "--no-eval"], ok=False)
    assert res.exit_code == 2 and "unreachable" in res.output and "(-inf, 0)" in res.output
    # a file that is not a symensemble checkpoint / a model without a SymHead
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    res = run(["teleport", str(foreign), "--target", "1", "--no-eval"], ok=False)
    assert res.exit_code == 2 and "not a symensemble checkpoint" in res.output
    res = run(["inspect", str(tmp_path / "missing.safetensors")], ok=False)
    assert res.exit_code == 2 and "no checkpoint" in res.output
    res = run(["teleport", str(ckpt), "--flattest", "trace", "--data", str(tmp_path / "nodata")], ok=False)
    assert res.exit_code == 2 and "--data" in res.output


def test_teleport_flattest_with_eval_on_a_tiny_image_tree(tmp_path, isolated_cache):
    root = write_tree(tmp_path / "tree", synthetic_cifar(n_train=40, n_test=40, n_val=0))
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "flat.safetensors"
    res = run(
        [
            "teleport",
            str(ckpt),
            "--flattest",
            "top",
            "--data",
            str(root),
            "--samples",
            "24",
            "--max-evals",
            "6",
            "--lanczos-iters",
            "8",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert "top eigenvalue" in res.output and "test loss" in res.output
    data = json.loads(out.with_suffix(".json").read_text())
    ev, fl = data["evaluation"], data["flatness"]
    assert ev["equal"] and ev["rel_loss_change"] <= 1e-5
    assert fl["top_after"] <= fl["top_before"]
    assert load_model(out, with_info=True)[1]["metrics"]["test_accuracy"] == ev["after"]["accuracy"]


@pytest.mark.cifar
def test_teleport_shipped_checkpoint_keeps_test_loss_and_accuracy(tmp_path):
    ckpt = SHIPPED / "paper_cnn.safetensors"
    root = real_cifar_root()
    if not ckpt.is_file() or root is None:
        pytest.skip("needs checkpoints/paper_cnn.safetensors and $SYMENSEMBLE_DATA")
    before = head_q_summary(load_model(ckpt))["total"]
    target = round(before / 4, 3)
    out = tmp_path / "paper_cnn-teleported.safetensors"
    run(["teleport", str(ckpt), "--target", str(target), "--data", root, "--out", str(out), "--quiet"])
    data = json.loads(out.with_suffix(".json").read_text())
    ev = data["evaluation"]
    assert ev["equal"] and ev["rel_loss_change"] <= 1e-5 and ev["rel_accuracy_change"] <= 1e-5
    assert math.isclose(head_q_summary(load_model(out))["total"], target, rel_tol=1e-5, abs_tol=1e-4)


@pytest.mark.parametrize("target, match", [("1e308", "too far along the orbit"), ("1e80", "overflow"),
                                           ("-1e308", "too far along the orbit")])
def test_teleport_refuses_non_finite_results_and_writes_nothing(tmp_path, target, match):
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "far" / "moved.safetensors"
    res = run(["teleport", str(ckpt), "--target", target, "--no-eval", "--out", str(out)], ok=False)
    assert res.exit_code == 2 and match in res.output
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_lists_are_comma_separated_or_repeated_and_output_defaults_to_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--steps", "20", "--h", "4", "--quiet"]
    run(["dynamics", "--activation", "identity,tanh", "--lr", "0.1,0.01", *common, "--out", "a"])
    run(["dynamics", "--activation", "identity", "--activation", "tanh", "--lr", "0.1", "--lr", "0.01",
         *common, "--out", "b"])
    a, b = (json.loads((tmp_path / d / "dynamics.json").read_text()) for d in ("a", "b"))
    assert a["settings"] == b["settings"] and a["results"] == b["results"]
    assert a["settings"]["activations"] == ["identity", "tanh"] and a["settings"]["lrs"] == [0.1, 0.01]
    res = run(["dynamics", "--activation", "identity,radial"], ok=False)
    assert res.exit_code == 2 and "'radial' is not one of" in res.output
    run(["inspect", str(_checkpoint(tmp_path))])
    (folder,) = (tmp_path / "runs").glob("q-inspect-*")
    assert _outputs(folder, "tiny-leaky_relu")["command_line"]
