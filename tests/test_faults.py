"""Regression probes for issue #13: bad input and faults must give clear errors, never lost
work or silent wrong numbers. Each test failed on the code the issue was filed against."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import symensemble as se
from symensemble import data as data_mod
from symensemble.checkpoint import CheckpointError, save_checkpoint
from symensemble.cli import main
from symensemble.data import CIFAR10_CLASSES, DataError, load_cifar10
from symensemble.ensembles.ensemble import SymmetryEnsemble
from symensemble.training import loop as train_mod
from symensemble.training import metrics as metrics_mod
from symensemble.training.recipe import Recipe

from .conftest import real_cifar_root, write_image_tree, write_tiny_recipe


def _recipe(tmp_path: Path, epochs: int = 1, extra: str = "") -> Path:
    return write_tiny_recipe(tmp_path, epochs, extra)


def _train_cli(*args: str):
    return CliRunner().invoke(main, ["train", "--quiet", *args])


@pytest.fixture
def tree(tmp_path, isolated_cache) -> Path:
    return write_image_tree(tmp_path / "data", per_class=1)


def _tiny_model() -> se.SymModel:
    torch.manual_seed(0)
    return se.create_model("paper_cnn", hidden=4, act="tanh", channels=2).eval()


# --- 1, 2: train must not lose work -----------------------------------------------------------

def test_train_refuses_an_existing_out_unless_resume_or_overwrite(tmp_path, tree):
    out = tmp_path / "m.safetensors"
    recipe = str(_recipe(tmp_path))
    first = _train_cli("--recipe", recipe, "--data", str(tree), "--out", str(out), "--seed", "1")
    assert first.exit_code == 0, first.output
    again = _train_cli("--recipe", recipe, "--data", str(tree), "--out", str(out), "--seed", "2")
    assert again.exit_code == 2 and "already exists" in again.output and "--overwrite" in again.output
    assert se.load_model(out, with_info=True)[1]["recipe"]["seed"] == 1  # the first run is kept
    replaced = _train_cli("--recipe", recipe, "--data", str(tree), "--out", str(out), "--seed", "2",
                          "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert se.load_model(out, with_info=True)[1]["recipe"]["seed"] == 2


def test_train_checks_out_is_writable_before_training(tmp_path, tree, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("data were loaded before --out was checked")

    monkeypatch.setattr("symensemble.training.loop.load_cifar10", no_training)
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    bad_outs = [a_file / "x.safetensors", tmp_path]
    if Path("/proc").is_dir() and os.name == "posix":
        bad_outs.append(Path("/proc/x.safetensors"))
    for bad in bad_outs:
        res = _train_cli("--recipe", str(_recipe(tmp_path)), "--data", str(tree), "--out", str(bad))
        assert res.exit_code == 2, (bad, res.output)
        assert "--out" in res.output and "Traceback" not in res.output and res.exception is not None
    assert a_file.read_text() == "x" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_ctrl_c_during_train_says_resume_continues(tmp_path, tree, monkeypatch):
    calls = {"n": 0}
    evaluate = metrics_mod.evaluate_split

    def interrupt_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 1 evaluated val and test, and was saved
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(metrics_mod, "evaluate_split", interrupt_in_epoch_two)
    out, recipe = tmp_path / "m.safetensors", str(_recipe(tmp_path, epochs=3))
    res = _train_cli("--recipe", recipe, "--data", str(tree), "--out", str(out))
    assert res.exit_code == 1 and "--resume" in res.output and "epoch (1)" in res.output
    monkeypatch.setattr(metrics_mod, "evaluate_split", evaluate)
    resumed = _train_cli("--recipe", recipe, "--data", str(tree), "--out", str(out), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert se.load_model(out, with_info=True)[1]["epoch"] == 3


def test_diverging_runs_warn_and_non_finite_losses_stop(tiny_cifar, tmp_path):
    tiny = dict(hidden=4, model_kwargs={"channels": 2}, batch_size=16, epochs=1, val_size=0)
    with pytest.warns(UserWarning, match="diverging"):  # Adam at lr 100: loss ~7e9, still finite
        train_mod.train(Recipe(**tiny, lr=100.0), data=tiny_cifar, out=tmp_path / "a.safetensors",
                        device="cpu", progress=False)
    out = tmp_path / "b.safetensors"
    with pytest.raises(train_mod.DivergenceError, match="loss is nan"):  # SGD at lr 10: NaN in epoch 1
        train_mod.train(Recipe(**tiny, lr=10.0, optimizer="sgd", momentum=0.0), data=tiny_cifar, out=out,
                        device="cpu", progress=False)
    assert not out.exists()  # no NaN weights were saved


def test_cli_reports_divergence_without_a_traceback(tmp_path, tree):
    recipe = _recipe(tmp_path, extra='optimizer = "sgd"\nmomentum = 0.0\nlr = 1e30\n')
    res = _train_cli("--recipe", str(recipe), "--data", str(tree), "--out", str(tmp_path / "m.safetensors"),
                     "--batch-size", "2")
    assert res.exit_code == 1 and "training diverged" in res.output and "Traceback" not in res.output


def test_too_large_val_size_is_reported_as_the_recipe(tmp_path, tree):
    recipe = _recipe(tmp_path, extra="").read_text().replace("val_size = 2", "val_size = 50")
    (tmp_path / "big_val.toml").write_text(recipe)
    res = _train_cli("--recipe", str(tmp_path / "big_val.toml"), "--data", str(tree),
                     "--out", str(tmp_path / "m.safetensors"))
    assert res.exit_code == 2 and "val_size" in res.output and "big_val.toml" in res.output
    assert "--data" not in res.output


# --- 3, 4, 6, 8: data --------------------------------------------------------------------------

@pytest.mark.parametrize("drop, add", [("cat", None), (None, "cats"), ("dog", "dogs")])
def test_a_tree_without_exactly_the_cifar10_classes_is_refused(tmp_path, isolated_cache, drop, add):
    classes = [c for c in CIFAR10_CLASSES if c != drop] + ([add] if add else [])
    root = write_image_tree(tmp_path / "t", per_class=1, classes=tuple(classes))
    with pytest.raises(DataError, match="exactly the 10 CIFAR-10 class folders") as info:
        load_cifar10(root, val_size=0)
    message = str(info.value)
    assert (f"missing: ['{drop}']" if drop else "missing: none") in message
    assert (f"unexpected: ['{add}']" if add else "unexpected: none") in message


@pytest.mark.cifar
@pytest.mark.skipif(real_cifar_root() is None, reason="SYMENSEMBLE_DATA has no CIFAR-10")
def test_the_real_tree_missing_one_class_is_refused(tmp_path, isolated_cache):
    real = data_mod._find_tree(Path(real_cifar_root()))
    for split in ("train", "test"):
        (tmp_path / "t" / split).mkdir(parents=True)
        for name in CIFAR10_CLASSES:
            if name != "cat":  # the probe: labels used to shift, class 3 became "deer"
                (tmp_path / "t" / split / name).symlink_to(real / split / name)
    with pytest.raises(DataError, match=r"missing: \['cat'\]"):
        load_cifar10(tmp_path / "t")


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_decoded_cache_sees_an_image_rewritten_in_place(tmp_path, isolated_cache):
    root = write_image_tree(tmp_path / "t", per_class=1)
    before = load_cifar10(root, val_size=0)
    image, folder = root / "test" / "cat" / "0000.png", root / "test" / "cat"
    stamps = {p: os.stat(p) for p in (image, folder)}
    from torchvision.io import encode_png

    new = torch.full((3, 32, 32), 7, dtype=torch.uint8)
    image.write_bytes(encode_png(new).numpy().tobytes())
    for p, st in stamps.items():  # timestamps set back: only the content changed
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = load_cifar10(root, val_size=0)
    cat = CIFAR10_CLASSES.index("cat")
    assert torch.equal(after.test.images[cat], new)
    assert not torch.equal(before.test.images[cat], new)


def _archive_bytes(tmp_path: Path) -> tuple[bytes, int]:
    """An uncompressed tar of a tiny tree, and the header offset of its last image."""
    tree = write_image_tree(tmp_path / "src" / "cifar10", per_class=1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(tree, arcname="cifar10")
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        last = [m for m in tar.getmembers() if m.isfile()][-1]
    return raw, last.offset


def _assert_nothing_left(cache: Path) -> None:
    extracted = cache / "extracted"
    assert not extracted.exists() or list(extracted.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncated", "flipped_bytes", "bad_member_header"])
def test_broken_archives_give_a_data_error_naming_them_and_leave_nothing(tmp_path, isolated_cache, damage):
    raw, last_header = _archive_bytes(tmp_path)
    compressed = gzip.compress(raw, mtime=0)
    if damage == "truncated":
        blob = compressed[: len(compressed) // 2]
    elif damage == "flipped_bytes":
        middle = len(compressed) // 2
        flipped = bytes(b ^ 0x5A for b in compressed[middle:middle + 64])
        blob = compressed[:middle] + flipped + compressed[middle + 64:]
    else:  # a valid gzip of a tar whose last member header is damaged: tarfile took it for the end
        damaged = bytearray(raw)
        damaged[last_header + 10] ^= 0xFF
        blob = gzip.compress(bytes(damaged), mtime=0)
    archive = tmp_path / "cifar10.tar.gz"
    archive.write_bytes(blob)
    for _ in range(2):  # a second try meets no leftovers of the first
        with pytest.raises(DataError, match="cannot extract") as info:
            load_cifar10(archive)
        assert str(archive) in str(info.value)
        if damage == "truncated":
            assert "truncated" in str(info.value)
        _assert_nothing_left(isolated_cache)


def test_a_good_archive_still_extracts_once(tmp_path, isolated_cache):
    raw, _ = _archive_bytes(tmp_path)
    archive = tmp_path / "cifar10.tar.gz"
    archive.write_bytes(gzip.compress(raw))
    assert len(load_cifar10(archive, val_size=0).train) == 10
    (done,) = (isolated_cache / "extracted").iterdir()
    assert (done / data_mod._COMPLETE).is_file()


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_decode_errors_name_the_file(tmp_path, isolated_cache, fmt):
    root = write_image_tree(tmp_path / "t", per_class=2, fmt=fmt)
    bad = root / "train" / "dog" / f"0001.{fmt}"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated image
    with pytest.raises(DataError, match="cannot decode image file") as info:
        load_cifar10(root, val_size=0)
    assert str(bad) in str(info.value)


def test_default_root_finds_the_tree_extracted_from_an_archive(tmp_path, isolated_cache, monkeypatch):
    raw, _ = _archive_bytes(tmp_path)
    archive = tmp_path / "cifar10.tar.gz"
    archive.write_bytes(gzip.compress(raw))
    monkeypatch.delenv("SYMENSEMBLE_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # nothing at ~/.cache/symensemble itself
    first = load_cifar10(archive, val_size=0)
    again = load_cifar10(val_size=0)
    assert torch.equal(first.train.images, again.train.images)


def test_failed_download_leaves_no_folder(tmp_path, isolated_cache, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, root, train, download):
            raise RuntimeError("Error downloading cifar-10-python.tar.gz (no network)")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    target = tmp_path / "new" / "cifar"
    with pytest.raises(DataError, match="could not load CIFAR-10"):
        load_cifar10(target, download=True)
    assert not (tmp_path / "new").exists()


# --- 5: non-finite checkpoints -----------------------------------------------------------------

def test_save_checkpoint_refuses_non_finite_weights(tmp_path):
    model = _tiny_model()
    path = save_checkpoint(model, tmp_path / "m.safetensors", epoch=1)
    kept = path.read_bytes()
    with torch.no_grad():
        model.head.U.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or infinity.*head.U.weight"):
        save_checkpoint(model, path, epoch=2)
    assert path.read_bytes() == kept  # the good checkpoint is untouched
    with torch.no_grad():
        model.head.U.weight[0, 0] = 0.0
    with pytest.raises(CheckpointError, match="train_state/optim.0.exp_avg"):
        save_checkpoint(model, path, train_state={"optim.0.exp_avg": torch.tensor([float("inf")])})


def test_load_model_refuses_a_checkpoint_with_non_finite_weights(tmp_path):
    good = save_checkpoint(_tiny_model(), tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(good))
    tensors["head.V.bias"][1] = float("inf")
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)  # written by other means
    with pytest.raises(CheckpointError, match=r"NaN or infinity \(\['head.V.bias'\]\)"):
        se.load_model(tmp_path / "bad.safetensors")


# --- 7: inputs of models and ensembles ----------------------------------------------------------

@pytest.fixture
def model_and_ensemble():
    model = _tiny_model()
    cal = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, SymmetryEnsemble(model, cal, num_members=4, samples_per_member=4, eps=1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_images_are_refused_before_the_svd(bad):
    cal = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cal[5, 1, 2, 3] = bad
    with pytest.raises(ValueError, match="calibration_images hold 1 NaN or infinite.*sample 5"):
        SymmetryEnsemble(_tiny_model(), cal, num_members=4, samples_per_member=4, eps=1.0)


def test_wrong_image_size_is_named(model_and_ensemble):
    for net in model_and_ensemble:
        with pytest.raises(ValueError, match="expects 32x32 images.*got 28x28"):
            net(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="expects 32x32 images"):
        se.create_model("resnet18", hidden=4).eval()(torch.rand(1, 3, 28, 28))


def test_non_finite_inputs_are_refused(model_and_ensemble):
    x = torch.rand(3, 3, 32, 32)
    x[2, 0, 0, 0] = float("nan")
    for net in model_and_ensemble:
        for aggregate in ("vote", "mean"):
            kw = {"aggregate": aggregate} if isinstance(net, SymmetryEnsemble) else {}
            with pytest.raises(ValueError, match="NaN or infinite.*the first is sample 2"):
                net(x, **kw)


def test_pixel_range_inputs_warn_and_unit_range_inputs_do_not(model_and_ensemble):
    x = torch.rand(2, 3, 32, 32)
    for net in model_and_ensemble:
        with pytest.warns(UserWarning, match="outside \\[0, 1\\].*divide by 255"):
            net(x * 255)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            net(x)
    with pytest.raises(ValueError, match="floating-point images.*x.float\\(\\) / 255"):
        model_and_ensemble[0]((x * 255).to(torch.uint8))


# --- 9: smaller issues -----------------------------------------------------------------------

def test_errors_are_exported_at_the_top_level():
    from symensemble.training.recipe import RecipeError

    assert se.CheckpointError is CheckpointError and se.DataError is DataError
    assert se.RecipeError is RecipeError and se.DivergenceError is train_mod.DivergenceError
    assert {"CheckpointError", "DataError", "RecipeError", "DivergenceError"} <= set(se.__all__)


def test_alpha_message_talks_about_the_step_size():
    res = CliRunner().invoke(main, ["attack", "--alpha", "-1"])
    assert res.exit_code == 2
    error = res.output.splitlines()[-1]
    assert "--alpha" in error and "step size" in error and "eps" not in error


def _quickstart_commands() -> list[list[str]]:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split()[1:] for line in block.splitlines() if line.startswith("symensemble ")]


def test_readme_quickstart_needs_no_development_paths(tmp_path, monkeypatch):
    """The quickstart's commands run for a user anywhere: train downloads into the default
    root, attack reads from it; no path that exists only in the development setup."""
    commands = _quickstart_commands()
    assert [c[0] for c in commands] == ["train", "attack"]
    assert not any("shared" in arg or arg.startswith("..") for c in commands for arg in c)
    asked = []

    def fake_load(source=None, *, download=False, **kwargs):
        asked.append((source, download))
        raise DataError("stop here: no network in tests")

    monkeypatch.setattr(train_mod, "load_cifar10", fake_load)
    monkeypatch.chdir(tmp_path)  # train creates runs/ for its default --out
    repo = Path(__file__).resolve().parent.parent
    train_args = [str(repo / a) if a.startswith("recipes/") else a for a in commands[0]]
    res = CliRunner().invoke(main, train_args)
    assert res.exit_code == 2 and "stop here" in res.output, res.output
    assert asked == [(None, True)]  # the default root, with --download
