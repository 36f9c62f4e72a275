"""Connecting an ensemble to a model's head: finding, naming and checking its pieces.

The head itself is the one abstraction :class:`~symensemble.symmetry.heads.HeadParts`
(found by :func:`~symensemble.symmetry.heads.find_head`); this module adds what an ensemble
needs on top: that the pieces are live submodules, Linear where the transforms act on
weights, and that together they reproduce ``model(x)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..runtime import eval_mode
from ..symmetry.heads import HeadParts, find_head
from .calibration import image_batches, model_device
from .members import is_pointwise

__all__ = ["model_head", "check_parts", "check_composition", "parts_from_names"]


def model_head(model: nn.Module) -> HeadParts:
    """The model's head by :func:`~symensemble.symmetry.heads.find_head`, with embed(x) required."""
    try:
        parts = find_head(model)
    except ValueError as err:
        parts, reason = None, str(err)
    if parts is not None and parts.embed is not None:
        return parts
    raise ValueError(
        f"{type(model).__name__} has no symmetry head: expected a symensemble model with "
        "`embed(x)` and `head.V`, `head.act`, `head.U` (a SymHead)"
        + ("" if parts is not None else f" ({reason})")
        + "; for your own network use SymmetryEnsemble.from_modules(model, calibration_images, "
        "embed=..., V='fc1', act='act', U='fc2')"
    )


def _is_submodule(model: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in model.modules())


def _check_activation(act: Callable[[Tensor], Tensor], h: int) -> None:
    probe = torch.linspace(-2.0, 2.0, 3 * h, dtype=torch.float64).view(3, h)
    try:
        out = act(probe)
    except Exception as err:  # noqa: BLE001 - any failure means the head is unusable here
        raise ValueError(
            f"the hidden activation {act!r} must accept float64 CPU tensors of shape "
            f"(..., {h}) (members are drawn in float64): {err}"
        ) from None
    if not isinstance(out, Tensor) or out.shape != probe.shape:
        raise ValueError(
            f"the hidden activation must map (..., {h}) to (..., {h}); got "
            f"{getattr(out, 'shape', type(out))}"
        )


def check_parts(model: nn.Module, parts: HeadParts, transform: str) -> None:
    """Refuse heads the transforms cannot act on, with what was expected."""
    layers = (("U", parts.U),) if parts.V is None else (("V", parts.V), ("U", parts.U))
    for label, layer in layers:
        if not isinstance(layer, nn.Linear):
            raise ValueError(
                f"transform {transform!r} acts on a Linear → activation → Linear head, but {label} "
                f"is a {type(layer).__name__}; expected an nn.Linear"
            )
        if not _is_submodule(model, layer):
            raise ValueError(
                f"{label} must be a submodule of the model (so it moves and saves with it)"
            )
    if parts.spatial and not is_pointwise(parts.act):
        raise ValueError("a spatial head needs an elementwise activation (σ acts per position); got "
                         f"{parts.act!r}")
    if parts.V is not None and parts.U.in_features != parts.V.out_features:
        raise ValueError(
            f"U takes {parts.U.in_features} features but V gives {parts.V.out_features}; "
            "expected V: d → h and U: h → C with the same hidden width h"
        )
    if not callable(parts.act) or not callable(parts.embed):
        raise ValueError("act and embed must be callables (modules or functions)")
    _check_activation(parts.act, parts.hidden_features)


@torch.no_grad()
def check_composition(model: nn.Module, parts: HeadParts, images: Tensor | None, n: int = 8) -> None:
    """Raise unless U(act(V(embed(x)))) equals model(x) on a few images."""
    if images is None:
        return
    x = next(image_batches(images[:n], n))[1].to(model_device(model))
    try:
        with eval_mode(model):
            expected = model(x)
            got = parts(x)
    except Exception as err:  # noqa: BLE001 - report any failure as a wrong decomposition
        raise ValueError(
            f"could not evaluate U(act(V(embed(x)))) on the calibration images: {err}"
        ) from None
    if not isinstance(expected, Tensor) or expected.shape != got.shape:
        raise ValueError(
            f"model(x) has shape {getattr(expected, 'shape', type(expected))} but "
            "U(act(V(embed(x)))) "
            f"has shape {tuple(got.shape)}; embed must give exactly the features entering V"
        )
    err = float((expected - got).abs().max())
    tol = 1e-4 * (1.0 + float(expected.abs().max()))
    if not err <= tol:
        raise ValueError(
            f"model(x) differs from U(act(V(embed(x)))) by {err:.3g} on calibration images: the "
            "named modules must make up the model's whole output path (embed = everything before "
            "V, nothing after U); pass check_composition=False to skip this check"
        )


def _flatten(x: Tensor) -> Tensor:
    return x.flatten(1)


def _resolve(model: nn.Module, label: str, ref: Any) -> Any:
    if isinstance(ref, str):
        try:
            return model.get_submodule(ref)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            raise ValueError(
                f"{label}={ref!r} is not a submodule of {type(model).__name__}; its "
                "submodules "
                f"are {names[:20]}{' ...' if len(names) > 20 else ''}"
            ) from None
    return ref


def parts_from_names(model: nn.Module, embed: Any, V: Any, act: Any, U: Any) -> HeadParts:
    """HeadParts from submodule names or objects (``embed=None``: ``x.flatten(1)``)."""
    embed_fn = _resolve(model, "embed", embed) if embed is not None else _flatten
    return HeadParts(embed_fn, _resolve(model, "V", V), _resolve(model, "act", act),
                     _resolve(model, "U", U))
