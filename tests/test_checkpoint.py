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


# --- issue 20: metadata cannot make load_model read files, allocate blindly or load garbage -----

def _tampered(tmp_path, model, name: str, *, model_name: str | None = None, args: dict | None = None,
              cast: torch.dtype | None = None):
    """A copy of ``model``'s checkpoint with its metadata or weight dtype altered."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    src = save_checkpoint(model, tmp_path / "src.safetensors")
    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
    tensors = load_file(str(src))
    if model_name is not None:
        meta["model_name"] = model_name
    if args is not None:
        meta["model_args"] = json.dumps(args)
    if cast is not None:
        tensors = {k: v.to(cast) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, tmp_path / name, metadata=meta)
    return tmp_path / name


def test_metadata_cannot_name_a_file_for_the_constructor(tmp_path, model, monkeypatch):
    secret = tmp_path / "weights.pt"
    torch.save({"x": torch.ones(1)}, secret)
    opened = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a) or {})
    path = _tampered(tmp_path, model, "evil.safetensors", model_name="resnet18",
                     args={"hidden": 4, "timm_kwargs": {"checkpoint_path": str(secret)}})
    with pytest.raises(CheckpointError, match=r"timm_kwargs\.checkpoint_path .* is not allowed.*never paths"):
        se.load_model(path)
    assert opened == []  # refused from the metadata alone
    for args, bad in [({"hidden": 4, "act": "/etc/passwd"}, "act"),
                      ({"hidden": 4, "pretrained_file": "x.pt"}, "pretrained_file"),
                      ({"hidden": 4, "act_kwargs": {"profile": "../x"}}, "act_kwargs.profile"),
                      ({"hidden": "4"}, "hidden")]:
        with pytest.raises(CheckpointError, match=f"model argument {bad} = .* is not allowed"):
            se.load_model(_tampered(tmp_path, model, "bad.safetensors", args=args))


def test_metadata_shapes_are_checked_before_the_model_is_built(tmp_path, model, monkeypatch):
    import symensemble.checkpoint as ckpt

    huge = {"hidden": 10**9, "act": "tanh", "channels": 2}
    path = _tampered(tmp_path, model, "huge.safetensors", args=huge)
    real = ckpt.create_model
    built_for_real = []

    def watch(name, **kwargs):  # a real (non-meta) build would allocate 10**9 x 512 floats
        built_for_real.append(torch.empty(0).device.type != "meta")
        return real(name, **kwargs)

    monkeypatch.setattr(ckpt, "create_model", watch)
    with pytest.raises(CheckpointError, match=r"do not match model 'paper_cnn' \(wrong shape: .*head\.V"):
        se.load_model(path)
    assert built_for_real == [False]  # only the shape skeleton on the meta device


def test_non_float_weights_are_refused(tmp_path, model):
    path = _tampered(tmp_path, model, "int.safetensors", cast=torch.int32)
    with pytest.raises(CheckpointError, match=r"wrong dtype \(floating-point weights expected\): .*conv"):
        se.load_model(path)
    half = _tampered(tmp_path, model, "half.safetensors", cast=torch.float16)  # a float dtype still loads
    assert se.load_model(half).conv.weight.dtype == torch.float32


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (SHIPPED.parent / "recipes").glob("*.toml")
                                           if not p.stem.startswith("paper_fig")))  # fig*: attack configs
def test_every_shipped_recipe_writes_allowed_model_args(recipe):
    from symensemble.checkpoint import check_model_args
    from symensemble.training.recipe import load_recipe

    check_model_args(load_recipe(SHIPPED.parent / "recipes" / f"{recipe}.toml").model_config(), recipe)
