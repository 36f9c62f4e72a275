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
    """The default output folder of a command: ``<root>/<name>-<YYYYmmdd-HHMMSS>`` (local time)."""
    return Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
