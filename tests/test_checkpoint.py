"""Safe checkpoints: round trip, metadata, refusal of bad files, atomic writes, the shipped model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import symensemble as se
from symensemble.checkpoint import CheckpointError, read_checkpoint, save_checkpoint

from .conftest import SHIPPED, real_cifar_root


@pytest.fixture
def model():
    torch.manual_seed(0)
    return se.create_model("paper_cnn", hidden=4, act="tanh", channels=2).eval()


def test_round_trip(tmp_path, model):
    path = save_checkpoint(model, tmp_path / "m.safetensors", recipe={"lr": 0.1}, epoch=3,
                           metrics={"test_accuracy": 0.5}, data_source="synthetic")
    loaded, info = se.load_model(path, with_info=True)
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    assert info["model_name"] == "paper_cnn"
    assert info["model_args"] == {"hidden": 4, "act": "tanh", "channels": 2}
    assert (info["recipe"], info["epoch"], info["metrics"]) == ({"lr": 0.1}, 3, {"test_accuracy": 0.5})
    assert info["data_source"] == "synthetic" and info["symensemble_version"] == se.__version__
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left


def test_train_state_is_not_model_state(tmp_path, model):
    path = save_checkpoint(model, tmp_path / "m.safetensors", train_state={"optim.0.exp_avg": torch.ones(2)})
    tensors, _ = read_checkpoint(path)
    assert "train_state/optim.0.exp_avg" in tensors
    se.load_model(path)  # the extra tensors do not disturb loading


def test_refuses_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        se.load_model(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 7 + b"definitely not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        se.load_model(junk)
    pickle_file = tmp_path / "model.safetensors"
    torch.save({"a": torch.ones(1)}, pickle_file)  # a pickle in disguise is refused, not unpickled
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        se.load_model(pickle_file)


def test_refuses_foreign_and_mismatched_files(tmp_path, model):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a symensemble checkpoint"):
        se.load_model(foreign)

    path = save_checkpoint(model, tmp_path / "m.safetensors")
    tensors, _ = read_checkpoint(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    bad_shape = dict(tensors, **{"head.V.weight": torch.zeros(5, 512)})
    save_file(bad_shape, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="wrong shape"):
        se.load_model(tmp_path / "shape.safetensors")
    missing = {k: v for k, v in tensors.items() if k != "conv.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="missing"):
        se.load_model(tmp_path / "missing.safetensors")
    save_file(tensors, str(tmp_path / "unknown.safetensors"), metadata=dict(meta, model_name="mystery"))
    with pytest.raises(CheckpointError, match="not registered"):
        se.load_model(tmp_path / "unknown.safetensors")
    save_file(tensors, str(tmp_path / "args.safetensors"), metadata=dict(meta, model_args="{oops"))
    with pytest.raises(CheckpointError, match="model_args"):
        se.load_model(tmp_path / "args.safetensors")


def test_refuses_unregistered_model_and_bad_suffix(tmp_path, model):
    with pytest.raises(CheckpointError, match=".safetensors"):
        save_checkpoint(model, tmp_path / "m.pt")
    plain = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="create_model"):
        save_checkpoint(plain, tmp_path / "p.safetensors")  # type: ignore[arg-type]


@pytest.mark.skipif(not (SHIPPED / "paper_cnn.safetensors").is_file(), reason="no shipped checkpoint")
def test_shipped_checkpoint_loads_by_name_in_a_fresh_process():
    code = ("import json, symensemble as se; m, i = se.load_model('paper_cnn', with_info=True); "
            "print(json.dumps({'name': i['model_name'], 'acc': i['metrics']['test_accuracy'], "
            "'h': m.head.hidden_features}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=SHIPPED.parent)
    info = json.loads(out.stdout)
    assert info["name"] == "paper_cnn" and info["h"] == 16 and info["acc"] >= 0.62


@pytest.mark.cifar
@pytest.mark.skipif(real_cifar_root() is None or not (SHIPPED / "paper_cnn.safetensors").is_file(),
                    reason="needs SYMENSEMBLE_DATA and the shipped checkpoint")
def test_shipped_checkpoint_matches_its_card():
    from symensemble.data import load_cifar10
    from symensemble.training.metrics import evaluate_split

    model, info = se.load_model(SHIPPED / "paper_cnn.safetensors", with_info=True)
    result = evaluate_split(model, load_cifar10(real_cifar_root()).test)
    assert result["accuracy"] == pytest.approx(info["metrics"]["test_accuracy"], abs=1e-9)
    assert result["accuracy"] >= 0.62


def test_git_revision_format():
    import re

    from symensemble.checkpoint import git_revision

    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", git_revision())
