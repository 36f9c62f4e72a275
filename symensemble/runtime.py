"""Process-level helpers every entry point shares: device choice, eval mode, thread caps, provenance.

These touch state outside one function (the torch thread pool, a module's train flag), so
each is a context manager that restores what it changed, and the caller decides when to use it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__

__all__ = [
    "resolve_device",
    "eval_mode",
    "thread_cap",
    "single_thread",
    "available_memory",
    "ensemble_memory",
    "require_memory",
    "MemoryEstimateError",
    "git_revision",
    "versions",
    "provenance",
    "PACKAGE_ROOT",
]

#: The package folder. In a source checkout (editable install) its parent is the repository,
#: which holds the shipped ``checkpoints/`` and ``recipes/``; git runs there for provenance.
PACKAGE_ROOT = Path(__file__).resolve().parent


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None → CUDA when available else CPU; any other name as given.

    Raises:
        ValueError: a CUDA device was asked for but torch sees none.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(
            f"unknown device {str(device)!r} ({err}); expected 'auto', 'cpu' or 'cuda'"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} was requested but torch sees no CUDA GPU: there is no CUDA "
            f"device on this machine (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}); use 'cpu' or 'auto'"
        )
    return dev


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode inside the block and restore its train/eval flag after.

    Restores the flag of every submodule, not only the top one: ``module.train(flag)`` would
    overwrite submodules that were deliberately left in another mode (a frozen backbone).
    """
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def thread_cap(n: int) -> Iterator[None]:
    """Cap torch's intra-op CPU threads at max(1, n) inside the block (never raises the count).

    Tiny tensors stepped through many times (the two-layer studies, batched h × h LAPACK
    calls) run faster on one thread: thread hand-offs cost more than the arithmetic (about
    2.5x on two cores).
    """
    before = torch.get_num_threads()
    n = max(1, int(n))
    if n >= before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_thread() -> contextlib.AbstractContextManager[None]:
    """``thread_cap(1)``."""
    return thread_cap(1)


class MemoryEstimateError(ValueError):
    """Work refused up front: its memory estimate exceeds what the machine has available."""


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or ``None``."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**28 else f"{n / 2**20:.3g} MiB"


def ensemble_memory(num_members: int, samples_per_member: int, hidden: int, classes: int, *,
                    calibration: bool = True, image_bytes: int = 0, backbone_bytes: int = 4
                    ) -> dict[str, int]:
    """Estimated peak bytes of building a symmetry ensemble, by part, and their ``total``.

    The one memory estimator for member and sample sizes: G members of a width-h head with C
    classes, s calibration images each (``calibration``), float64 members.

    * ``calibration_images``: G·s images of ``image_bytes`` each (0 when the images are
      streamed from storage the caller already holds);
    * ``calibration_hidden``: G·s·h pre-activations, in the backbone's dtype and float64;
    * ``members``: the stored g_k (h × h) and W_k (C × h), float64;
    * ``draw``: scratch of drawing them at once — exp(eps·T), σ(g H_k) and its SVD, π.
    """
    G, s, h, C = (int(v) for v in (num_members, samples_per_member, hidden, classes))
    per_sample = s if calibration else 0
    parts = {
        "calibration_images": G * per_sample * int(image_bytes),
        "calibration_hidden": G * per_sample * h * (8 + int(backbone_bytes)),
        "members": G * 8 * (h * h + C * h),
        "draw": G * 8 * (4 * h * h + 2 * C * h + 6 * h * per_sample),
    }
    parts["total"] = sum(parts.values())
    return parts


def require_memory(needed: int, what: str, fix: str, available: int | None = None) -> None:
    """Refuse work whose estimate ``needed`` exceeds the available memory, before allocating.

    Raises:
        MemoryEstimateError: naming the work, the estimate, the memory available and ``fix``.
    """
    avail = available_memory() if available is None else available
    if avail is not None and needed > avail:
        raise MemoryEstimateError(
            f"{what} needs about {_gib(needed)} of memory but only {_gib(avail)} is available; {fix}"
        )


def git_revision() -> str:
    """The git commit of the source tree this package runs from, ``+dirty`` when it has
    uncommitted changes to tracked files, or ``"unknown"`` outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PACKAGE_ROOT, capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()

    try:
        revision = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return revision + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    """Versions of symensemble, torch, torchattacks (without importing it) and Python."""
    try:
        torchattacks = importlib.metadata.version("torchattacks")
    except importlib.metadata.PackageNotFoundError:
        torchattacks = "not installed"
    return {
        "symensemble": __version__,
        "torch": torch.__version__,
        "torchattacks": torchattacks,
        "python": platform.python_version(),
    }


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """What produced a result: ``versions``, ``git_revision`` and the ``command_line``
    (``argv``, default ``sys.argv``)."""
    return {
        "versions": versions(),
        "git_revision": git_revision(),
        "command_line": list(sys.argv if argv is None else argv),
    }
