"""Calibration: the images each member's π is solved on, and their pre-activations H_k.

Member k of a ``group`` ensemble uses calibration images [k·s, (k+1)·s) and solves
π(g_k, H_k) = σ(H_k) σ(g_k H_k)⁺ on their pre-activations H_k (App. I, eq. 84; the solve
itself is :func:`~symensemble.symmetry.pi_solver.pi_matrix`, called by the member
transforms). This module prepares H: image checks, the backbone pass, optional noise, and the
distinctness check that catches a rank-deficient σ(g H_k) for every g before any solve.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..inputs import check_model_input
from ..runtime import available_memory, ensemble_memory, eval_mode, require_memory
from ..symmetry.heads import HeadParts

__all__ = [
    "DEFAULT_SAMPLES_PER_HIDDEN",
    "default_samples_per_member",
    "as_images",
    "image_batches",
    "calibration_hidden",
    "add_noise",
    "check_distinct",
    "prepare_hidden",
    "member_images",
    "check_ensemble_memory",
    "log_conditions",
    "model_device",
]

log = logging.getLogger(__name__)

#: default calibration images per member, as a multiple of the hidden width h. With s = h the
#: solve for π is square: members interpolate their h images exactly and extrapolate with the
#: full cond(σ(g H_k)) ≈ 1e7 (eps = 10); s = 2h makes π a least-squares fit that costs far less
#: clean accuracy (docs/ensembles.md, "Choosing samples_per_member": the measured table).
DEFAULT_SAMPLES_PER_HIDDEN = 2
#: scratch bytes of the distinctness check: members are compared a chunk at a time
_DISTINCT_CHUNK_BYTES = 64 * 2**20
#: the calibration noise has its own stream, so turning it on leaves the member draws unchanged
_NOISE_SEED_OFFSET = 0x6E6F697365


def default_samples_per_member(hidden: int) -> int:
    """The default s for a head of width h: ``DEFAULT_SAMPLES_PER_HIDDEN · h``."""
    return DEFAULT_SAMPLES_PER_HIDDEN * int(hidden)


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def as_images(images: Tensor | None) -> Tensor | None:
    """Check the calibration tensor's type, shape and dtype; floats are returned as they are,
    uint8 as they are too (converted batch by batch by :func:`image_batches`, so a large
    calibration set is never copied whole)."""
    if images is None:
        return None
    if not isinstance(images, Tensor):
        raise ValueError(f"calibration_images must be a tensor, got {type(images).__name__}")
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(
            "calibration_images must be a non-empty batch (N, ...), got shape "
            f"{tuple(images.shape)}"
        )
    if images.dtype != torch.uint8 and not torch.is_floating_point(images):
        raise ValueError(f"calibration_images must be uint8 or floating point, got {images.dtype}")
    return images


def image_batches(images: Tensor, batch_size: int) -> Iterator[tuple[int, Tensor]]:
    """(first index, float batch) pairs; uint8 pixels are divided by 255 per batch."""
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size]
        yield i, (x.float().div_(255) if x.dtype == torch.uint8 else x)


@torch.inference_mode()
def calibration_hidden(model: nn.Module, parts: HeadParts, images: Tensor, batch_size: int = 1000
                       ) -> Tensor:
    """Pre-activations H = V(embed(x)) of the calibration images, model in eval mode.

    Every batch passes the same input check as ``model(x)`` and ``ens(x)``
    (:func:`~symensemble.inputs.check_model_input`: size, dtype, finite values, range).
    """
    device = model_device(model)
    out = []
    with eval_mode(model):
        for i, x in image_batches(images, batch_size):
            x = x.to(device)
            check_model_input(model, x, "SymmetryEnsemble", what="calibration_images", offset=i)
            out.append(parts.hidden(x))
    return torch.cat(out)


def member_images(images: Tensor | None, num_members: int, samples: int, transform: str, hidden: int
                  ) -> Tensor:
    """The first G·s calibration images (checked), or a ValueError saying how many are needed."""
    needed = num_members * samples
    images = as_images(images)
    have = 0 if images is None else images.shape[0]
    if images is None or have < needed:
        raise ValueError(
            f"transform {transform!r} with num_members={num_members} and "
            f"samples_per_member={samples} needs at least {needed} "
            f"calibration images (member k uses images [k·s, (k+1)·s)), got {have}; pass "
            "more images, fewer members or a smaller samples_per_member"
        )
    if samples > hidden:
        log.info("samples_per_member=%d > h=%d: π is a least-squares fit and members no longer "
                 "reproduce the model exactly on their calibration images", samples, hidden)
    return images[:needed]


def prepare_hidden(model: nn.Module, parts: HeadParts, images: Tensor, samples: int, noise: float, seed: int,
                   check: bool) -> tuple[Tensor, int]:
    """H_k rows of every member, (G·s·P, h), and P, the positions per image (1 dense, T tokens
    in block mode): noise added, distinctness checked over each member's s·P rows (``check``)."""
    hidden = calibration_hidden(model, parts, images)
    positions = 1 if hidden.ndim == 2 else int(hidden[0, ..., 0].numel())
    hidden = add_noise(hidden.reshape(-1, hidden.shape[-1]), noise, seed)
    if check:
        check_distinct(hidden, samples * positions)
    return hidden, positions


def check_ensemble_memory(num_members: int, samples: int, hidden: int, classes: int,
                          keeps_hidden: bool) -> None:
    """Refuse, before any allocation, an ensemble whose construction cannot fit in memory
    (:func:`~symensemble.runtime.ensemble_memory`; ``keeps_hidden``: H_k of every member kept)."""
    need = ensemble_memory(num_members, samples, hidden, classes, calibration=keeps_hidden)
    fits = (available_memory() or 0) // max(1, need["total"] // num_members)
    require_memory(
        need["total"],
        f"SymmetryEnsemble(num_members={num_members}"
        + (f", samples_per_member={samples})" if keeps_hidden else ")"),
        f"pass fewer members (about {fits:,} fit)"
        + (" or a smaller samples_per_member" if keeps_hidden else ""),
    )


def log_conditions(condition: Tensor | None, transform: str, members: int, eps: float, samples: int
                   ) -> None:
    """Log the spread of cond(σ(g_k H_k)) of a draw (members above 1e12 lose exactness)."""
    if condition is None:
        return
    c = condition
    log.info(
        "%s ensemble: %d members, eps=%g, s=%d; cond(σ(g_k H_k)) median %.3g, max %.3g; "
        "%d members above 1e12 reproduce their calibration logits only to ~cond·1e-16",
        transform, members, eps, samples, float(c.median()), float(c.max()), int((c > 1e12).sum()),
    )


def add_noise(hidden: Tensor, std: float, seed: int) -> Tensor:
    """H + std·N(0, 1), from a stream of its own (seed + offset), as the authors' notebook."""
    if not std:
        return hidden
    noise_gen = torch.Generator().manual_seed((seed + _NOISE_SEED_OFFSET) % 2**63)
    noise = torch.randn(hidden.shape, generator=noise_gen, dtype=hidden.dtype)
    noisy = hidden + std * noise.to(hidden.device)
    if not bool(torch.isfinite(noisy).all()):
        raise ValueError(
            f"calibration_noise={std:g} overflows the calibration pre-activations in {hidden.dtype} "
            f"(largest finite value {torch.finfo(hidden.dtype).max:.3g}; the pre-activations are at most "
            f"{float(hidden.abs().max()):.3g}); use a noise far below that scale, e.g. 1e-4"
        )
    return noisy


def check_distinct(hidden: Tensor, s: int, max_bytes: int | None = None) -> None:
    """Refuse members whose calibration images give the same pre-activations.

    Two equal columns make σ(g H_k) rank-deficient for every g. In the backbone's precision
    "equal" means equal up to rounding (a duplicated image in another batch row differs by a
    few ulps), so columns closer than 100·eps(dtype) relative to their norm count as equal.
    Members are compared in chunks of at most ``max_bytes`` (default 64 MiB) of (c, s, s)
    float64 distances, never all G at once.

    Shape:
        hidden (G·s, h).
    """
    if s < 2:
        return
    G = hidden.shape[0] // s
    tol = 100 * torch.finfo(hidden.dtype).eps
    per_chunk = max(1, (max_bytes or _DISTINCT_CHUNK_BYTES) // (8 * s * s))
    for start in range(0, G, per_chunk):
        stop = min(G, start + per_chunk)
        Hk = hidden[start * s : stop * s].detach().to(torch.float64).view(stop - start, s, -1)
        rel = _relative_distances(Hk)
        bad = torch.nonzero(rel <= tol)
        if bad.numel():
            k, i, j = (int(v) for v in bad[0])
            _raise_duplicate(start + k, i, j, s, float(rel[k, i, j]))


def _relative_distances(Hk: Tensor) -> Tensor:
    """(c, s, s) pairwise distances of each member's columns over the larger norm; diagonal inf."""
    s = Hk.shape[1]
    dist = torch.cdist(Hk, Hk)
    norm = Hk.norm(dim=-1)
    scale = torch.maximum(norm.unsqueeze(-1), norm.unsqueeze(-2)).clamp_min(
        torch.finfo(torch.float64).tiny
    )
    return (dist / scale).masked_fill(torch.eye(s, dtype=torch.bool, device=Hk.device), math.inf)


def _raise_duplicate(k: int, i: int, j: int, s: int, rel: float) -> None:
    raise ValueError(
        f"member {k}: σ(g_k H_k) is rank-deficient for every g (condition number inf): "
        f"calibration images {k * s + i} and {k * s + j} have the same hidden "
        f"pre-activations (relative difference {rel:.2g}); pass distinct "
        "calibration images, or ridge=... for a regularized solve"
    )
