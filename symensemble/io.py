"""Files written safely: atomic writes that respect the umask, and JSON with one number policy.

Every result file of the package goes through here, so a crash never leaves a half-written
file (temp file in the same folder + ``os.replace``) and a file is readable by whoever the
user's umask lets read it (``tempfile.mkstemp`` alone would leave it at mode 0600).

JSON policy for non-finite numbers: NaN and ±inf become ``null``. That keeps every file valid
JSON (``json.dumps`` would otherwise write the non-standard ``NaN``/``Infinity`` tokens) and
says "no value" rather than inventing a string that readers would have to special-case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "to_jsonable",
    "write_json",
    "default_run_dir",
    "OutputError",
    "check_out_dir",
    "check_out_file",
    "staged_dir",
]


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore at once (not thread-safe, but brief)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it becomes ``path`` (mode 0666 & ~umask).

    Whatever the block writes to the temp path replaces ``path`` in one ``os.replace``; when the
    block raises, the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic text write (UTF-8); see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values from tensors, numpy values, dataclasses, tuples and paths.

    Non-finite floats become ``None`` (the module's policy); anything unknown becomes its ``str``.
    """
    if hasattr(obj, "detach"):  # torch tensors (imported lazily: this module stays torch-free)
        obj = obj.detach().cpu()
        return to_jsonable(obj.item() if obj.ndim == 0 else obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return to_jsonable(obj.item())
    return str(obj)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (:func:`to_jsonable`) atomically; returns the path."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2) + "\n")


def default_run_dir(name: str, root: str | os.PathLike = "runs") -> Path:
    """A fresh default output folder: ``<root>/<name>-<YYYYmmdd-HHMMSS>`` (local time), with
    ``-2``, ``-3``, ... appended when a run of the same second already took that name."""
    base = Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder, k = base, 1
    while folder.exists():
        k += 1
        folder = base.with_name(f"{base.name}-{k}")
    return folder


# --------------------------------------------------------------------------------------------
# One output-folder policy for every command that writes a folder (attack, reproduce, q)
# --------------------------------------------------------------------------------------------


class OutputError(ValueError):
    """An output folder that cannot be used: not writable, a file, or holding another run."""


def check_out_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Check, before any work, that ``out`` can receive this run's files; returns it as a Path.

    The policy: a folder that does not exist or is empty is used; a non-empty one is refused
    unless ``overwrite`` (then it is replaced whole by :func:`staged_dir`, so files of the
    earlier run never stay beside the new ones). A probe folder is made (and removed) in the
    nearest existing folder above ``out``, so an unwritable place fails here, not after the
    work; nothing is left on disk.

    Raises:
        OutputError: ``out`` is a file, holds files without ``overwrite``, contains the
            current or home folder (never replaced), or cannot be created or written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{str(out)!r} is a file; expected a folder for the results")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"{str(out)!r} already holds files (of an earlier run?); pass "
                              "--overwrite to replace the folder, or choose a new --out")
        here = out.resolve()
        if here in (Path.cwd(), *Path.cwd().parents, Path.home(), *Path.home().parents):
            raise OutputError(f"{str(out)!r} contains the current or home folder; --overwrite "
                              "replaces the whole folder, so choose a folder of its own")
    _probe(out, "a folder that can be created and written")
    return out


def check_out_file(path: str | os.PathLike) -> Path:
    """Check, before any work, that a file can be written at ``path`` (its folder can be made
    and written, and ``path`` is not a folder); returns it as a Path.

    Raises:
        OutputError: names the path, why, and what was expected.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{str(path)!r} is a folder; expected a file path")
    _probe(path, "a file path whose folder can be created and written")
    return path


def _probe(out: Path, expected: str) -> None:
    """Make and remove a folder in the nearest existing folder above ``out`` (nothing is left)."""
    place = out.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        if not place.is_dir():
            raise NotADirectoryError(f"{str(place)!r} is a file")
        Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".check", dir=place)).rmdir()
    except OSError as err:
        why = f"{str(place)!r} does not accept new files ({err.strerror})" if err.strerror else str(err)
        raise OutputError(f"cannot write the results to {str(out)!r}: {why}; expected {expected}"
                          ) from None


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``out``; on success it becomes ``out`` by renames.

    A run's files are written into the temp folder; only when the block finishes does the
    folder take ``out``'s name (an existing ``out`` is moved aside first and then deleted), so
    ``out`` never holds a half-written run nor a mix of two. When the block raises, the temp
    folder is removed and ``out`` is left as it was. Check ``out`` first with
    :func:`check_out_dir`.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
