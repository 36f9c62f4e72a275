"""CIFAR-10 as uint8 tensors, from a torchvision root, a class-folder tree or a ``.tar.gz``.

Accepted sources (``source`` argument, else ``$SYMENSEMBLE_DATA``, else ``~/.cache/symensemble``):

* a class-folder tree ``train/<class>/*.{png,jpg}`` and ``test/<class>/*`` (the fast.ai and
  Kaggle copies), given as the folder holding ``train/`` and ``test/`` or its parent;
* a ``.tar.gz``/``.tgz`` of such a tree (extracted once into the cache folder);
* a torchvision root (``cifar-10-batches-py/``), downloaded there when ``download=True``.

Decoded images are cached as one safetensors file, so a second load takes well under a second.
Batches live on the training device and augmentation runs batch-wise on tensors (no
DataLoader workers), as in airbench.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "CIFAR10_CLASSES",
    "DataError",
    "Split",
    "CIFAR10",
    "load_cifar10",
    "default_data_root",
    "iterate_batches",
    "augment_batch",
]

log = logging.getLogger(__name__)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_LAYOUTS = (
    "accepted layouts: (1) a folder with train/<class>/*.png|jpg and test/<class>/*.png|jpg "
    "(or its parent folder); (2) a .tar.gz of such a tree; (3) a torchvision CIFAR-10 root "
    "containing cifar-10-batches-py/ (pass download=True / --download to fetch it)"
)


class DataError(ValueError):
    """A data source that is missing or does not have an accepted CIFAR-10 layout."""


@dataclass
class Split:
    """One split: ``images`` uint8 (N, 3, 32, 32) and ``labels`` int64 (N,).

    Images keep the source's order, which for class-folder trees is class by class: draw
    subsets (calibration images, evaluation subsets) at random, never as a prefix.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def float_images(self) -> torch.Tensor:
        """Images as float32 in [0, 1], shape (N, 3, 32, 32)."""
        return self.images.float().div_(255)

    def to(self, device: str | torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass
class CIFAR10:
    """CIFAR-10 train (minus validation), validation and test splits."""

    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]
    source: str


def default_data_root() -> Path:
    """``$SYMENSEMBLE_DATA`` if set, else ``~/.cache/symensemble``."""
    env = os.environ.get("SYMENSEMBLE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "symensemble"


def _cache_dir() -> Path:
    env = os.environ.get("SYMENSEMBLE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "symensemble"


def _has_tree(folder: Path) -> bool:
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def _find_tree(folder: Path) -> Path | None:
    """``folder`` itself or a direct subfolder holding ``train/`` and ``test/``."""
    if _has_tree(folder):
        return folder
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and _has_tree(p)) if folder.is_dir() else []
    return subs[0] if subs else None


def _class_folders(split_dir: Path) -> list[Path]:
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"{split_dir} has no class folders; {_LAYOUTS}")
    return folders


def _tree_fingerprint(tree: Path) -> str:
    """Cheap key for the decoded cache: path plus mtimes and sizes of the class folders."""
    h = hashlib.sha1(str(tree.resolve()).encode())
    for split in ("train", "test"):
        for folder in _class_folders(tree / split):
            st = folder.stat()
            h.update(f"{split}/{folder.name}:{st.st_mtime_ns}:{st.st_size}".encode())
    return h.hexdigest()[:16]


def _decode_folder(split_dir: Path, classes: list[str]) -> Split:
    """Decode every image of ``split_dir/<class>/`` (JPEGs in one batched call)."""
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            raise DataError(f"{split_dir} lacks class folder {name!r} (train and test must match)")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"no .png/.jpg images under {split_dir}; {_LAYOUTS}")
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        images = _decode_files(paths)
    shapes = {tuple(img.shape) for img in images}
    if shapes != {(3, 32, 32)}:
        raise DataError(f"images under {split_dir} must all be 32x32 RGB, found shapes {sorted(shapes)[:3]}")
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


def _decode_files(paths: list[Path]) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

    raw = [read_file(str(p)) for p in paths]
    is_jpeg = [p.suffix.lower() in {".jpg", ".jpeg"} for p in paths]
    decoded: list[torch.Tensor] = [torch.empty(0)] * len(paths)
    try:
        jpeg_idx = [i for i, j in enumerate(is_jpeg) if j]
        if jpeg_idx:
            batch = decode_jpeg([raw[i] for i in jpeg_idx], mode=ImageReadMode.RGB)
            for i, img in zip(jpeg_idx, batch):
                decoded[i] = img
        for i in (i for i, j in enumerate(is_jpeg) if not j):
            decoded[i] = decode_image(raw[i], mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise DataError(f"cannot decode an image near {paths[0].parent.parent}: {err}") from None
    return decoded


def _load_tree(tree: Path) -> tuple[Split, Split, tuple[str, ...]]:
    classes = [p.name for p in _class_folders(tree / "train")]
    if sorted(classes) == sorted(CIFAR10_CLASSES):
        classes = list(CIFAR10_CLASSES)
    key = _tree_fingerprint(tree)
    cache = _cache_dir() / "decoded" / f"tree-{key}.safetensors"
    if cache.is_file():
        try:
            t = load_file(str(cache))
            train = Split(t["train_images"], t["train_labels"])
            return train, Split(t["test_images"], t["test_labels"]), tuple(classes)
        except (SafetensorError, KeyError, OSError) as err:
            log.warning("ignoring unreadable decoded cache %s (%s)", cache, err)
    log.info("decoding images under %s (cached afterwards in %s)", tree, cache)
    train = _decode_folder(tree / "train", classes)
    test = _decode_folder(tree / "test", classes)
    _save_cache(cache, train, test)
    return train, test, tuple(classes)


def _save_cache(cache: Path, train: Split, test: Split) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        save_file(
            {"train_images": train.images, "train_labels": train.labels,
             "test_images": test.images, "test_labels": test.labels},
            str(tmp),
        )
        os.replace(tmp, cache)
    except OSError as err:  # a read-only cache is not fatal: the data was decoded anyway
        log.warning("could not write decoded cache %s (%s)", cache, err)


def _extract_tarball(archive: Path) -> Path:
    """Extract ``archive`` once into the cache folder and return the tree inside."""
    st = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = _cache_dir() / "extracted" / key
    tree = _find_tree(dest) if dest.is_dir() else None
    if tree is not None:
        return tree
    tmp = dest.with_name(f".{key}.{os.getpid()}.tmp")
    log.info("extracting %s into %s", archive, dest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(tmp, filter="data")  # refuses absolute paths, links out of tree
        if dest.exists():  # an earlier extraction without a usable tree: replace it
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except (tarfile.TarError, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if dest.is_dir() and _find_tree(dest) is not None:  # another process finished first
            return _find_tree(dest)  # type: ignore[return-value]
        raise DataError(f"cannot extract {archive}: {err}; {_LAYOUTS}") from None
    tree = _find_tree(dest)
    if tree is None:
        raise DataError(f"{archive} does not contain train/ and test/ class folders; {_LAYOUTS}")
    return tree


def _load_torchvision(root: Path, download: bool) -> tuple[Split, Split, tuple[str, ...]]:
    from torchvision.datasets import CIFAR10 as TVCIFAR10

    def split(train: bool) -> Split:
        ds = TVCIFAR10(str(root), train=train, download=download)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return Split(images, torch.tensor(ds.targets, dtype=torch.int64))

    try:
        return split(True), split(False), CIFAR10_CLASSES
    except (RuntimeError, OSError) as err:
        raise DataError(f"torchvision could not load CIFAR-10 from {root}: {err}; {_LAYOUTS}") from None


def _resolve(source: str | os.PathLike | None, download: bool) -> tuple[Split, Split, tuple[str, ...], str]:
    root = Path(source).expanduser() if source is not None else default_data_root()
    if root.is_file():
        if root.name.endswith((".tar.gz", ".tgz", ".tar")):
            tree = _extract_tarball(root)
            return (*_load_tree(tree), f"tarball:{root.resolve()}")
        raise DataError(f"{root} is a file but not a .tar.gz archive; {_LAYOUTS}")
    if root.is_dir():
        tree = _find_tree(root)
        if tree is not None:
            return (*_load_tree(tree), f"folder:{tree.resolve()}")
        if (root / "cifar-10-batches-py").is_dir() or download:
            return (*_load_torchvision(root, download), f"torchvision:{root.resolve()}")
        archives = sorted(root.glob("*.tar.gz"))
        if len(archives) == 1:
            return (*_load_tree(_extract_tarball(archives[0])), f"tarball:{archives[0].resolve()}")
    elif download:
        root.mkdir(parents=True, exist_ok=True)
        return (*_load_torchvision(root, True), f"torchvision:{root.resolve()}")
    raise DataError(f"no CIFAR-10 data found at {root}; {_LAYOUTS}")


def load_cifar10(
    source: str | os.PathLike | None = None,
    *,
    download: bool = False,
    val_size: int = 5000,
    seed: int = 0,
) -> CIFAR10:
    """Load CIFAR-10 as uint8 tensors with a deterministic validation split.

    Args:
        source: a class-folder tree, a ``.tar.gz`` of one, or a torchvision root; ``None``
            uses ``$SYMENSEMBLE_DATA`` or ``~/.cache/symensemble``.
        download: let torchvision download CIFAR-10 into ``source`` when it is not there.
        val_size: training images held out for validation (a seeded random subset).
        seed: seed of the validation split.

    Raises:
        DataError: missing or malformed source; the message lists the accepted layouts.
    """
    train, test, classes, origin = _resolve(source, download)
    if not 0 <= val_size < len(train):
        raise DataError(
            f"val_size must be in [0, {len(train)}) for the {len(train)} training images found, "
            f"got {val_size} (use val_size=0 for no validation split)"
        )
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    return CIFAR10(train.subset(train_idx), train.subset(val_idx), test, classes, origin)


def augment_batch(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, batch-wise.

    Shape:
        images (B, C, H, W) → (B, C, H, W), same dtype and device.
    """
    b, c, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    off = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(device)
    rows = (off[0, :, None] + torch.arange(h, device=device))[:, None, :, None]
    cols = off[1, :, None] + torch.arange(w, device=device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(b, device=device)[:, None, None, None]
    chan = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float images in [0, 1], labels) batches from a split already on its device.

    Shuffling and augmentation draw from ``generator`` (a CPU generator), so a run is
    reproducible from its seed; without one they draw a seed from the global RNG.
    """
    n = len(split)
    if generator is None and (shuffle or augment):
        # One stream per call, seeded from the global RNG (a fresh default Generator would
        # repeat the same crops every batch).
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    if shuffle:
        order = torch.randperm(n, generator=generator).to(split.labels.device)
    else:
        order = None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
        x = split.images[idx]
        if augment:
            x = augment_batch(x, generator)
        yield x.float().div_(255), split.labels[idx]
