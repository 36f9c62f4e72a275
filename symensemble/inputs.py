"""Cheap checks of the images given to models and ensembles, so bad input fails loudly.

Without them a NaN image gets finite logits and a class-0 vote, a 28×28 batch dies in a matmul
deep inside the network, and 0–255 pixel values silently cut accuracy from 0.6 to 0.17. The
checks cost one fused reduction (``aminmax``) and one host sync per call, never per-sample work;
they are skipped while a module trains (the training loop stops on a non-finite loss anyway,
and a sync per step would stall the GPU) and under tracing or ``torch.compile``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

__all__ = ["check_model_input", "require_finite"]

#: Slack for inputs that left [0, 1] by rounding only (e.g. an attack's last float step).
_RANGE_SLACK = 1e-3


def _tracing() -> bool:
    return torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()


def require_finite(x: Tensor, what: str) -> None:
    """Raise ``ValueError`` naming the first sample of ``x`` with a NaN or infinite value."""
    if _tracing() or not x.is_floating_point() or bool(torch.isfinite(x).all()):
        return
    _raise_non_finite(x, what)


def _raise_non_finite(x: Tensor, what: str, offset: int = 0) -> None:
    bad = ~torch.isfinite(x.detach().reshape(x.shape[0], -1) if x.ndim else x.detach().reshape(1, 1))
    per_sample = bad.sum(1)
    first = int(torch.nonzero(per_sample)[0, 0]) + offset
    of = f"of {bad.shape[0]} samples" if not offset else f"of samples {offset}–{offset + bad.shape[0] - 1}"
    raise ValueError(
        f"{what} hold {int(per_sample.sum())} NaN or infinite values in {int((per_sample > 0).sum())} "
        f"{of} (the first is sample {first}); pass finite images"
    )


def check_model_input(model: nn.Module, x: Tensor, where: str | None = None, *,
                      what: str | None = None, offset: int = 0) -> None:
    """Check images entering ``model`` (a SymModel, or a model an ensemble wraps).

    The one input check of models, ensembles and the ensembles' calibration images.

    * shape (B, C, H, W) and H = W = ``model.image_size`` when the model declares one;
    * floating point — uint8 pixels must be divided by 255 first;
    * finite values (``ValueError`` naming the first bad sample);
    * a warning when the values leave ``model.input_range`` (symensemble models: [0, 1]).

    Args:
        where: who receives the images, for messages (default: the model's class name).
        what: how the images are named in messages (default: "the images given to <where>").
        offset: index of ``x[0]`` in a larger set checked batch by batch (sample numbers in
            messages count from it).

    Raises:
        ValueError: wrong shape, size or dtype, or non-finite values.
    """
    where = where or type(model).__name__
    named = what or f"the images given to {where}"
    whose = f" ({what})" if what else ""
    if not isinstance(x, Tensor):
        raise ValueError(f"{where} expects an image tensor (B, C, H, W), got {type(x).__name__}")
    size = getattr(model, "image_size", None)
    if size is not None:
        if x.ndim != 4:
            raise ValueError(f"{where} expects images of shape (B, C, {size}, {size}), got "
                             f"{tuple(x.shape)}{whose}")
        if tuple(x.shape[-2:]) != (size, size):
            raise ValueError(
                f"{where} expects {size}x{size} images (the size it was built for), got "
                f"{x.shape[-2]}x{x.shape[-1]}{whose}; resize or pad the images first"
            )
    if not x.is_floating_point():
        raise ValueError(
            f"{where} expects floating-point images in [0, 1], got {x.dtype}; "
            "convert uint8 images with x.float() / 255"
        )
    if model.training or x.numel() == 0 or _tracing():
        return
    lo, hi = torch.stack(list(torch.aminmax(x.detach()))).tolist()  # NaN propagates into both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        _raise_non_finite(x, named, offset)
    bounds = getattr(model, "input_range", None)
    if bounds is not None and (lo < bounds[0] - _RANGE_SLACK or hi > bounds[1] + _RANGE_SLACK):
        warnings.warn(  # a fixed text, so Python shows it once per call site, not every batch
            f"{where} got image values outside [{bounds[0]:g}, {bounds[1]:g}] (0-255 pixel values?); "
            "symensemble models expect float images in [0, 1] and normalize inside — divide by 255",
            stacklevel=2,
        )
