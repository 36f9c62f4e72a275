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

import gzip
import hashlib
import logging
import os
import shutil
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "CIFAR10_CLASSES",
    "DataError",
    "SplitSizeError",
    "Split",
    "CIFAR10",
    "load_cifar10",
    "default_data_root",
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


class SplitSizeError(DataError):
    """A requested validation split that the training images found cannot provide."""


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


def _check_classes(split_dir: Path) -> None:
    """Refuse anything but the ten CIFAR-10 class folders: a missing class would shift every
    later label (a tree without "cat" turns class 3 into "deer") and give wrong numbers."""
    names = {p.name for p in _class_folders(split_dir)}
    missing = [c for c in CIFAR10_CLASSES if c not in names]
    extra = sorted(names - set(CIFAR10_CLASSES))
    if missing or extra:
        raise DataError(
            f"{split_dir} must hold exactly the 10 CIFAR-10 class folders {list(CIFAR10_CLASSES)}; "
            f"missing: {missing or 'none'}; unexpected: {extra or 'none'}"
        )


def _scan_tree(tree: Path) -> dict[str, list[list[os.DirEntry]]]:
    """The image files of train/ and test/, class by class in CIFAR-10 order, sorted by name."""
    listing: dict[str, list[list[os.DirEntry]]] = {}
    for split in ("train", "test"):
        _check_classes(tree / split)
        per_class = []
        for name in CIFAR10_CLASSES:
            with os.scandir(tree / split / name) as entries:
                files = sorted((e for e in entries if os.path.splitext(e.name)[1].lower() in _IMAGE_SUFFIXES
                                and e.is_file()), key=lambda e: e.name)
            if not files:
                raise DataError(f"class folder {tree / split / name} has no .png/.jpg images; {_LAYOUTS}")
            per_class.append(files)
        listing[split] = per_class
    return listing


def _tree_fingerprint(tree: Path, listing: dict[str, list[list[os.DirEntry]]]) -> str:
    """Key of the decoded cache: the tree's path and every image's name, size, mtime and ctime.

    Folder timestamps miss an image rewritten in place; the ctime also catches one whose mtime
    was set back (it cannot be set by the user). One stat per file: listing and key take about
    0.5 s for the 60,000 files of CIFAR-10 on 2 busy cores (benchmarks/data_fingerprint.py).
    """
    lines = [str(tree.resolve())]
    for split, per_class in listing.items():
        for name, files in zip(CIFAR10_CLASSES, per_class):
            lines.append(f"{split}/{name}")
            lines += [f"{e.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
                      for e, st in ((e, e.stat()) for e in files)]
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:16]


def _decode_split(split_dir: Path, per_class: list[list[os.DirEntry]]) -> Split:
    """Decode every image of one split (JPEGs in one batched call); labels follow CIFAR-10 order."""
    paths = [Path(e.path) for files in per_class for e in files]
    labels = [label for label, files in enumerate(per_class) for _ in files]
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        images = _decode_files(paths)
    wrong = next((i for i, img in enumerate(images) if tuple(img.shape) != (3, 32, 32)), None)
    if wrong is not None:
        raise DataError(
            f"images under {split_dir} must all be 32x32 RGB; {paths[wrong]} has shape "
            f"{tuple(images[wrong].shape[1:])} (H, W)"
        )
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


def _read_files(paths: list[Path]) -> list[torch.Tensor]:
    from torchvision.io import read_file

    raw = []
    for p in paths:
        try:
            raw.append(read_file(str(p)))
        except (RuntimeError, OSError) as err:
            raise DataError(f"cannot read image file {p}: {err}") from None
    return raw


def _decode_files(paths: list[Path]) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    raw = _read_files(paths)
    is_jpeg = [p.suffix.lower() in {".jpg", ".jpeg"} for p in paths]
    decoded: list[torch.Tensor] = [torch.empty(0)] * len(paths)
    jpeg_idx = [i for i, j in enumerate(is_jpeg) if j]
    try:
        if jpeg_idx:
            batch = decode_jpeg([raw[i] for i in jpeg_idx], mode=ImageReadMode.RGB)
            for i, img in zip(jpeg_idx, batch):
                decoded[i] = img
    except RuntimeError as err:
        _raise_for_bad_file([paths[i] for i in jpeg_idx], [raw[i] for i in jpeg_idx])
        raise DataError(f"cannot decode the JPEGs under {paths[0].parent.parent}: {err}") from None
    for i in (i for i, j in enumerate(is_jpeg) if not j):
        try:
            decoded[i] = decode_image(raw[i], mode=ImageReadMode.RGB)
        except RuntimeError as err:
            raise DataError(f"cannot decode image file {paths[i]}: {err}") from None
    return decoded


def _raise_for_bad_file(paths: list[Path], raw: list[torch.Tensor]) -> None:
    """After a batched JPEG decode failed, decode one by one to name the bad file (error path)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    for path, data in zip(paths, raw):
        try:
            decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError as err:
            raise DataError(f"cannot decode image file {path}: {err}") from None


def _load_tree(tree: Path) -> tuple[Split, Split, tuple[str, ...]]:
    listing = _scan_tree(tree)
    key = _tree_fingerprint(tree, listing)
    cache = _cache_dir() / "decoded" / f"tree-{key}.safetensors"
    if cache.is_file():
        try:
            t = load_file(str(cache))
            train = Split(t["train_images"], t["train_labels"])
            return train, Split(t["test_images"], t["test_labels"]), CIFAR10_CLASSES
        except (SafetensorError, KeyError, OSError) as err:
            log.warning("ignoring unreadable decoded cache %s (%s)", cache, err)
    log.info("decoding images under %s (cached afterwards in %s)", tree, cache)
    train = _decode_split(tree / "train", listing["train"])
    test = _decode_split(tree / "test", listing["test"])
    _save_cache(cache, train, test)
    return train, test, CIFAR10_CLASSES


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


#: Written into an extraction folder once the archive was read to its end and checked.
_COMPLETE = ".extraction-complete"


def _extract_verified(archive: Path, dest: Path) -> None:
    """Extract ``archive`` into ``dest``, then read the stream to its very end.

    tarfile stops silently at a damaged member header after the first (it takes it for the
    end of the archive), and gzip checks its CRC and length only at the end of the stream; so
    a corrupt archive would extract partly and look complete. Reading on to the end runs the
    gzip check, and anything there but tar's zero padding means a header was damaged.
    """
    with archive.open("rb") as probe:
        compressed = probe.read(2) == b"\x1f\x8b"
    with (gzip.open(archive, "rb") if compressed else archive.open("rb")) as fh:
        with tarfile.open(fileobj=fh, mode="r:") as tar:
            tar.extractall(dest, filter="data")  # refuses absolute paths, links out of tree
            end = tar.offset
        fh.seek(end)
        while chunk := fh.read(1 << 20):
            if chunk.count(0) != len(chunk):
                raise tarfile.ReadError(f"a damaged member header near byte {end} ended the listing early")


def _extract_tarball(archive: Path) -> Path:
    """Extract ``archive`` once into the cache folder and return the tree inside.

    Extraction goes to a temp folder that is renamed into place only after the whole archive
    was verified (:func:`_extract_verified`) and holds a tree; on any failure it is removed.
    """
    st = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = _cache_dir() / "extracted" / key
    tree = _find_tree(dest) if (dest / _COMPLETE).is_file() else None
    if tree is not None:
        return tree
    tmp = dest.with_name(f".{key}.{os.getpid()}.tmp")
    log.info("extracting %s into %s", archive, dest)
    try:
        _extract_verified(archive, tmp)
        if _find_tree(tmp) is None:
            raise DataError(f"{archive} does not contain train/ and test/ class folders; {_LAYOUTS}")
        (tmp / _COMPLETE).touch()
        if dest.exists():  # an earlier, unfinished extraction (made before the marker existed)
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and (dest / _COMPLETE).is_file() and _find_tree(dest) is not None:
            return _find_tree(dest)  # type: ignore[return-value]  # another process finished first
        if isinstance(err, EOFError):
            raise DataError(f"cannot extract {archive}: the archive is truncated ({err}); "
                            "download it again") from None
        if isinstance(err, (tarfile.TarError, OSError, zlib.error)):
            raise DataError(f"cannot extract {archive}: the archive is corrupt or unreadable ({err}); "
                            f"download it again; {_LAYOUTS}") from None
        raise
    return _find_tree(dest)  # type: ignore[return-value]


def _extracted_trees() -> list[Path]:
    """Trees completely extracted into the cache by earlier ``--data x.tar.gz`` runs, newest first."""
    base = _cache_dir() / "extracted"
    done = [p for p in base.iterdir() if (p / _COMPLETE).is_file()] if base.is_dir() else []
    done.sort(key=lambda p: (p / _COMPLETE).stat().st_mtime_ns, reverse=True)
    return [t for t in map(_find_tree, done) if t is not None]


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
        return _download_into_new_folder(root)
    if source is None and "SYMENSEMBLE_DATA" not in os.environ:
        extracted = _extracted_trees()  # what an earlier `--data x.tar.gz` left in the cache
        if extracted:
            log.info("no data at %s; using the tree extracted into the cache at %s", root, extracted[0])
            return (*_load_tree(extracted[0]), f"folder:{extracted[0].resolve()}")
    raise DataError(f"no CIFAR-10 data found at {root}; {_LAYOUTS}")


def _download_into_new_folder(root: Path) -> tuple[Split, Split, tuple[str, ...], str]:
    """torchvision download into a folder that does not exist yet; removed again on failure."""
    created = root
    while not created.parent.exists():  # the topmost folder this call creates
        created = created.parent
    root.mkdir(parents=True, exist_ok=True)
    try:
        return (*_load_torchvision(root, True), f"torchvision:{root.resolve()}")
    except BaseException:
        shutil.rmtree(created, ignore_errors=True)
        raise


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
        DataError: missing or malformed source (the message lists the accepted layouts), a
            tree without exactly the 10 CIFAR-10 class folders, a truncated or corrupt archive,
            or an image file that cannot be decoded (the message names it).
        SplitSizeError: ``val_size`` is not below the number of training images.
    """
    train, test, classes, origin = _resolve(source, download)
    if not 0 <= val_size < len(train):
        raise SplitSizeError(
            f"val_size must be in [0, {len(train)}) for the {len(train)} training images found, "
            f"got {val_size} (use val_size=0 for no validation split)"
        )
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    return CIFAR10(train.subset(train_idx), train.subset(val_idx), test, classes, origin)
