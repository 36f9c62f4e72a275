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

import torch
from torch import Tensor, nn

from ..inputs import require_finite
from ..runtime import eval_mode
from ..symmetry.heads import HeadParts

__all__ = [
    "DEFAULT_SAMPLES_PER_HIDDEN",
    "default_samples_per_member",
    "as_images",
    "calibration_hidden",
    "add_noise",
    "check_distinct",
    "model_device",
]

log = logging.getLogger(__name__)

#: default calibration images per member, as a multiple of the hidden width h. With s = h the
#: solve for π is square: members interpolate their h images exactly and extrapolate with the
#: full cond(σ(g H_k)) ≈ 1e7 (eps = 10); s = 2h makes π a least-squares fit that costs far less
#: clean accuracy (docs/ensembles.md, "Choosing samples_per_member": the measured table).
DEFAULT_SAMPLES_PER_HIDDEN = 2
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
    """uint8 → float/255; floats kept; shape and range checks."""
    if images is None:
        return None
    if not isinstance(images, Tensor):
        raise ValueError(f"calibration_images must be a tensor, got {type(images).__name__}")
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(
            "calibration_images must be a non-empty batch (N, ...), got shape "
            f"{tuple(images.shape)}"
        )
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    if not torch.is_floating_point(images):
        raise ValueError(f"calibration_images must be uint8 or floating point, got {images.dtype}")
    require_finite(images, "calibration_images")
    lo, hi = float(images.min()), float(images.max())
    if images.ndim == 4 and (lo < -1e-6 or hi > 1 + 1e-6):
        log.warning(
            "calibration_images span [%.3g, %.3g]; symensemble models expect [0, 1] images and "
            "normalize inside",
            lo,
            hi,
        )
    return images


@torch.inference_mode()
def calibration_hidden(model: nn.Module, parts: HeadParts, images: Tensor, batch_size: int = 1000
                       ) -> Tensor:
    """Pre-activations H = V(embed(x)) of the calibration images, model in eval mode."""
    device = model_device(model)
    with eval_mode(model):
        out = [
            parts.hidden(images[i : i + batch_size].to(device))
            for i in range(0, images.shape[0], batch_size)
        ]
    return torch.cat(out)


def add_noise(hidden: Tensor, std: float, seed: int) -> Tensor:
    """H + std·N(0, 1), from a stream of its own (seed + offset), as the authors' notebook."""
    if not std:
        return hidden
    noise_gen = torch.Generator().manual_seed((seed + _NOISE_SEED_OFFSET) % 2**63)
    noise = torch.randn(hidden.shape, generator=noise_gen, dtype=hidden.dtype)
    return hidden + std * noise.to(hidden.device)


def check_distinct(hidden: Tensor, s: int) -> None:
    """Refuse members whose calibration images give the same pre-activations.

    Two equal columns make σ(g H_k) rank-deficient for every g. In the backbone's precision
    "equal" means equal up to rounding (a duplicated image in another batch row differs by a
    few ulps), so columns closer than 100·eps(dtype) relative to their norm count as equal.

    Shape:
        hidden (G·s, h).
    """
    if s < 2:
        return
    G = hidden.shape[0] // s
    Hk = hidden[: G * s].detach().to(torch.float64).view(G, s, -1)
    dist = torch.cdist(Hk, Hk)  # (G, s, s)
    norm = Hk.norm(dim=-1)
    scale = torch.maximum(norm.unsqueeze(-1), norm.unsqueeze(-2)).clamp_min(
        torch.finfo(torch.float64).tiny
    )
    rel = (dist / scale).masked_fill(torch.eye(s, dtype=torch.bool), math.inf)
    tol = 100 * torch.finfo(hidden.dtype).eps
    bad = torch.nonzero(rel <= tol)
    if bad.numel():
        k, i, j = (int(v) for v in bad[0])
        raise ValueError(
            f"member {k}: σ(g_k H_k) is rank-deficient for every g (condition number inf): "
            f"calibration images {k * s + i} and {k * s + j} have the same hidden "
            f"pre-activations (relative difference {float(rel[k, i, j]):.2g}); pass distinct "
            "calibration images, or ridge=... for a regularized solve"
        )
