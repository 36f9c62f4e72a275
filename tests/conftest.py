"""Shared fixtures: tiny synthetic CIFAR-like data, image trees on disk, the real data if present.

Synthetic data: :func:`synthetic_cifar` (class templates + noise, learnable) is the generator for
new tests, with :func:`write_tree` to put it on disk as a class-folder tree.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from symensemble.data import CIFAR10, CIFAR10_CLASSES, Split


def make_split(n: int, num_classes: int = 3, seed: int = 0) -> Split:
    """Images whose mean colour encodes the class, so a tiny model can learn them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    base = (labels.float() / max(num_classes - 1, 1) * 200 + 20).view(n, 1, 1, 1)
    noise = torch.randint(-20, 21, (n, 3, 32, 32), generator=g).float()
    return Split((base + noise).clamp(0, 255).to(torch.uint8), labels.to(torch.int64))


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread: tiny batched LAPACK calls and two-layer loops are
    faster that way and immune to a busy machine (a 5 ms batched SVD took 2 s on 2 busy cores)."""
    from symensemble.runtime import single_thread

    with single_thread():
        yield


@pytest.fixture
def tiny_cifar() -> CIFAR10:
    return CIFAR10(make_split(96, seed=1), make_split(24, seed=2), make_split(24, seed=3),
                   ("a", "b", "c"), "synthetic")


def write_image_tree(root: Path, per_class: int = 3, classes=CIFAR10_CLASSES, fmt: str = "png",
                     size: int = 32) -> Path:
    """Write train/<class>/ and test/<class>/ with random images; returns ``root``."""
    import warnings

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs; these are test inputs
        warnings.simplefilter("ignore", DeprecationWarning)
        _write_tree(root, per_class, classes, fmt, size)
    return root


def _write_tree(root: Path, per_class: int, classes, fmt: str, size: int) -> None:
    from torchvision.io import encode_jpeg, encode_png

    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
                data = encode_png(img) if fmt == "png" else encode_jpeg(img, quality=90)
                (folder / f"{i:04d}.{fmt}").write_bytes(data.numpy().tobytes())


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Point the decoded/extracted cache at a temp folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SYMENSEMBLE_CACHE", str(cache))
    return cache


def real_cifar_root() -> str | None:
    """``$SYMENSEMBLE_DATA`` when it holds a CIFAR-10 tree (or its parent), else None (tests skip)."""
    root = os.environ.get("SYMENSEMBLE_DATA")
    if not root or not Path(root).is_dir():
        return None
    folders = [Path(root), *(p for p in Path(root).iterdir() if p.is_dir())]
    return root if any((f / "train").is_dir() and (f / "test").is_dir() for f in folders) else None


SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints"

TINY_RECIPE = ('model = "paper_cnn"\nhidden = 4\nmodel_kwargs = { channels = 2 }\n'
               "batch_size = 8\nepochs = {epochs}\nval_size = 2\n")


def write_tiny_recipe(folder: Path, epochs: int = 1, extra: str = "") -> Path:
    """A seconds-long training recipe (paper_cnn, h = 4, 2 channels) at folder/tiny<epochs>.toml;
    ``extra`` is appended (e.g. an ``[adversarial]`` table)."""
    path = folder / f"tiny{epochs}.toml"
    path.write_text(TINY_RECIPE.replace("{epochs}", str(epochs)) + extra)
    return path


# ---------------------------------------------------------------------------------------------
# The synthetic CIFAR-like world (learnable): the one generator for new tests. make_split above
# (mean colour) backs the tiny_cifar fixture of test_train/test_data, write_image_tree (pure
# noise) the loader tests, where content does not matter.
# ---------------------------------------------------------------------------------------------


def synthetic_cifar(n_train: int = 100, n_test: int = 60, n_val: int = 20, *, num_classes: int = 10,
                    seed: int = 0, size: int = 32, classes: tuple[str, ...] | None = None) -> CIFAR10:
    """The tests' synthetic CIFAR-like world: learnable, class-dependent uint8 images.

    One random template per class; each image is 0.55·template + 0.45·uniform noise (in [0, 1],
    stored ×255 as uint8); labels are class-ordered, n // num_classes per class. Templates, then
    the train, val and test splits are drawn from one generator seeded with ``seed``, so the
    same arguments give the same data everywhere (``write_tree`` puts it on disk; the folder
    loader accepts only the ten CIFAR-10 class names, the default ``classes``).
    """
    gen = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, 3, size, size, generator=gen)

    def split(n: int) -> Split:
        labels = torch.arange(num_classes).repeat_interleave(n // num_classes)  # class-ordered
        noise = torch.rand(len(labels), 3, size, size, generator=gen)
        images = (0.55 * templates[labels] + 0.45 * noise) * 255
        return Split(images.round().to(torch.uint8), labels)

    names = tuple(classes) if classes is not None else CIFAR10_CLASSES[:num_classes]
    return CIFAR10(split(n_train), split(n_val), split(n_test), names, "synthetic")


def write_tree(root: Path, data: CIFAR10, fmt: str = "png") -> Path:
    """Write ``data``'s train and test splits as a class-folder tree root/<split>/<class>/<i>.<fmt>."""
    import warnings

    from torchvision.io import encode_jpeg, encode_png

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs; these are test inputs
        warnings.simplefilter("ignore", DeprecationWarning)
        for name, split in (("train", data.train), ("test", data.test)):
            counts: dict[int, int] = {}
            for img, label in zip(split.images, split.labels.tolist(), strict=True):
                i = counts[label] = counts.get(label, -1) + 1
                folder = root / name / data.classes[label]
                folder.mkdir(parents=True, exist_ok=True)
                encoded = encode_png(img) if fmt == "png" else encode_jpeg(img, quality=90)
                (folder / f"{i}.{fmt}").write_bytes(encoded.numpy().tobytes())
    return root


# ---------------------------------------------------------------------------------------------
# Robustness tests (test_evaluate, test_portfolio, test_attacks, test_plan_runner_config): a tiny
# trained paper CNN on the synthetic world, and the settings of a fast evaluation.
# ---------------------------------------------------------------------------------------------


def tiny_model(data: CIFAR10, act: str = "leaky_relu", steps: int = 40, hidden: int = 4):
    """A 2-channel paper CNN with ``hidden`` head units, trained full-batch for ``steps`` Adam steps."""
    import symensemble as se

    torch.manual_seed(0)
    model = se.create_model("paper_cnn", hidden=hidden, channels=2, act=act)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data.train.float_images(), data.train.labels
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def small(**kw):
    """Settings of a fast evaluation (``evaluate(model, data, **small(...))``); override any."""
    base = dict(n=30, batch_size=16, num_members=3, ensemble_eps=0.1, seed=0, sanity=False)
    base.update(kw)
    return base
