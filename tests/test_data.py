"""CIFAR-10 sources (class-folder trees, tarballs, torchvision roots), caching and batching."""

from __future__ import annotations

import tarfile
import time

import numpy as np
import pytest
import torch

from symensemble import data as data_mod
from symensemble.data import DataError, Split, load_cifar10
from symensemble.training.batches import augment_batch, iterate_batches

from .conftest import write_image_tree


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_folder_tree(tmp_path, isolated_cache, fmt):
    root = write_image_tree(tmp_path / "tree", per_class=2, fmt=fmt)
    d = load_cifar10(root, val_size=2)
    assert d.classes == data_mod.CIFAR10_CLASSES
    assert d.train.images.shape == (18, 3, 32, 32) and d.train.images.dtype == torch.uint8
    assert d.val.images.shape == (2, 3, 32, 32)
    assert d.test.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert d.source.startswith("folder:")
    if fmt == "png":  # lossless: the decoded pixels are exactly those written
        from torchvision.io import decode_png, read_file

        cat = decode_png(read_file(str(root / "test" / "cat" / "0000.png")))
        assert torch.equal(d.test.images[2 * 3], cat)  # cat is class 3


def test_parent_folder_and_cache(tmp_path, isolated_cache):
    write_image_tree(tmp_path / "parent" / "cifar", per_class=1)
    d1 = load_cifar10(tmp_path / "parent", val_size=1)
    assert list((isolated_cache / "decoded").glob("*.safetensors"))
    t = time.perf_counter()
    d2 = load_cifar10(tmp_path / "parent", val_size=1)
    assert time.perf_counter() - t < 5
    assert torch.equal(d1.train.images, d2.train.images) and torch.equal(d1.test.labels, d2.test.labels)


def test_tarball(tmp_path, isolated_cache):
    tree = write_image_tree(tmp_path / "src" / "cifar10-jpeg", per_class=1, fmt="jpg")
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="cifar10-jpeg")
    d = load_cifar10(archive, val_size=1)
    assert len(d.train) + len(d.val) == 10 and len(d.test) == 10
    assert d.source.startswith("tarball:")
    assert load_cifar10(archive, val_size=1).train.images.equal(d.train.images)


def test_cifar_class_order(tmp_path, isolated_cache):
    classes = tuple(reversed(data_mod.CIFAR10_CLASSES))  # folder order must not matter
    write_image_tree(tmp_path / "t", per_class=1, classes=classes)
    d = load_cifar10(tmp_path / "t", val_size=0)
    assert d.classes == data_mod.CIFAR10_CLASSES


def test_torchvision_root(tmp_path, monkeypatch, isolated_cache):
    class FakeCIFAR10:
        def __init__(self, root, train, download):
            n = 8 if train else 4
            self.data = np.arange(n * 32 * 32 * 3, dtype=np.uint8).reshape(n, 32, 32, 3)
            self.targets = list(range(n))

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    (tmp_path / "tv" / "cifar-10-batches-py").mkdir(parents=True)
    d = load_cifar10(tmp_path / "tv", val_size=2)
    assert d.source.startswith("torchvision:")
    assert d.test.images.shape == (4, 3, 32, 32)
    # HWC -> CHW: pixel (0, 0) channels are the first three bytes.
    assert d.test.images[0, :, 0, 0].tolist() == [0, 1, 2]


def test_validation_split_is_deterministic(tiny_cifar, tmp_path, isolated_cache):
    write_image_tree(tmp_path / "t", per_class=1)
    a, b = load_cifar10(tmp_path / "t", val_size=3, seed=7), load_cifar10(tmp_path / "t", val_size=3, seed=7)
    assert torch.equal(a.val.images, b.val.images)
    c = load_cifar10(tmp_path / "t", val_size=3, seed=8)
    assert len(c.val) == 3 and len(c.train) == 7


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "missing", "no CIFAR-10 data found"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no CIFAR-10 data found"),
        (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "not a .tar.gz"),
    ],
)
def test_bad_sources_name_the_layouts(tmp_path, isolated_cache, make, match):
    with pytest.raises(DataError, match=match) as info:
        load_cifar10(make(tmp_path))
    assert "accepted layouts" in str(info.value)


def test_wrong_image_size(tmp_path, isolated_cache):
    write_image_tree(tmp_path / "t", per_class=1, size=16)
    with pytest.raises(DataError, match="32x32"):
        load_cifar10(tmp_path / "t", val_size=0)


def test_corrupt_tarball(tmp_path, isolated_cache):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(DataError, match="cannot extract"):
        load_cifar10(bad)


def test_bad_val_size(tmp_path, isolated_cache):
    write_image_tree(tmp_path / "t", per_class=1)
    with pytest.raises(data_mod.SplitSizeError, match="val_size"):
        load_cifar10(tmp_path / "t", val_size=10)


def test_augment_batch_is_crop_and_flip():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    g = torch.Generator().manual_seed(3)
    same = augment_batch(x, g, pad=0)  # no padding: each output is the image or its mirror
    for img, out in zip(x, same):
        assert torch.equal(out, img) or torch.equal(out, img.flip(2))
    y = augment_batch(x, torch.Generator().manual_seed(4))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, augment_batch(x, torch.Generator().manual_seed(4)))
    # Each output is a 32x32 window of the zero-padded image, possibly mirrored.
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    windows = padded.unfold(2, 32, 1).unfold(3, 32, 1)  # (B, C, 9, 9, 32, 32)
    for b in range(4):
        found = ((windows[b] == y[b][:, None, None]).all(dim=(-1, -2)).all(0).any()
                 or (windows[b] == y[b].flip(2)[:, None, None]).all(dim=(-1, -2)).all(0).any())
        assert found


def test_iterate_batches_covers_everything_once(tiny_cifar):
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([y for _, y in iterate_batches(tiny_cifar.train, 10, shuffle=True, generator=g)])
    assert sorted(seen.tolist()) == sorted(tiny_cifar.train.labels.tolist())
    x, _ = next(iterate_batches(tiny_cifar.train, 10))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_augmentation_without_a_generator_differs_between_batches():
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    same = Split(image.repeat(64, 1, 1, 1), torch.zeros(64, dtype=torch.long))
    first, second = [x for x, _ in iterate_batches(same, 32, augment=True)]
    assert not torch.equal(first, second)  # a fixed default generator gave identical batches
    again, _ = [x for x, _ in iterate_batches(same, 32, augment=True)]
    assert not torch.equal(first, again)


def test_retried_extraction_of_a_bad_archive_fails_cleanly(tmp_path, isolated_cache):
    src = tmp_path / "src" / "nothing"
    src.mkdir(parents=True)
    (src / "readme.txt").write_text("no images here")
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="nothing")
    for _ in range(2):  # the second try meets the first one's leftovers
        with pytest.raises(DataError, match="does not contain train/ and test/"):
            load_cifar10(archive)
