"""Teleportation along the symmetry orbit of a trained head (``symensemble q teleport``).

The positive scaling g = diag(c) acts on a homogeneous (or linear) head by
V_k ↦ c_k V_k, b_k ↦ c_k b_k, U_{:,k} ↦ c_k^{−α} U_{:,k} (eq. 22): the network function, hence
every loss and accuracy, is unchanged, while the conserved quantities move,

    Q_k(c) = c_k² a_k − α c_k^{−2α} b_k,   a_k = |V_k|² + b_k²,  b_k = |U_{:,k}|²,

so any reachable per-unit or total Q can be hit exactly (:func:`unit_scales_for_q`). The loss
Hessian is not invariant: with H the Hessian in the head parameters, its diagonal blocks scale
as H_VV/c_k² and H_UU·c_k^{2α}, so the trace is

    Tr H(c) = Σ_k A_k/c_k² + B_k c_k^{2α} + const,

minimized in closed form at c_k^{2α+2} = A_k/(α B_k) (:func:`flattest_scales` with
``objective="trace"``). A_k and B_k are computed exactly for the cross-entropy loss on a batch of
features (:func:`hessian_trace_terms`); the top eigenvalue is found by Lanczos and minimized by
a pattern search in log c started from the trace optimum (``objective="top"``).

O(h) (radial heads) acts by isometries of parameter space, so Q and the whole Hessian spectrum
are constant on its orbits; sigmoid and tanh heads have no linear symmetry. Both are refused.

This module holds the orbit maths (the scales c and the move); the Hessian terms and the
flattest point are in :mod:`.curvature`, the move itself and the checkpoint-to-checkpoint run
(``symensemble q teleport``) in :mod:`.teleport_run`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..symmetry.activations import Activation
from ..symmetry.conserved import orbit_scale_for_target, unit_q_terms
from ..symmetry.groups import HiddenGroup, group_kind_for_activation
from ..symmetry.linear import LinearSymmetry
from ..symmetry.module_bridge import load_stack_params, module_layers
from ..symmetry.stack import StackParams
from .inspection import head_stack

__all__ = [
    "teleport_group",
    "unit_scales_for_q",
    "scale_params",
    "apply_unit_scales",
    "check_scales",
]


def teleport_group(model: nn.Module) -> tuple[StackParams, Activation, float]:
    """The head θ (float64), its activation and α, after checking teleportation applies.

    Raises:
        ValueError: no SymHead; an activation without a continuous linear symmetry; a radial
            head (O(h) preserves Q and the Hessian spectrum).
    """
    params, act = head_stack(model)
    kind, alpha = group_kind_for_activation(act)  # raises for sigmoid, tanh, ...
    if kind == "orthogonal":
        raise ValueError(
            f"the {act.name!r} head's symmetry group O(h) acts by isometries of parameter space: "
            "Tr(VV^T + bb^T - U^T U) and the Hessian spectrum are the same at every point of the "
            "orbit, so no target Q or flatter point can be reached"
        )
    return params, act, alpha


def unit_scales_for_q(
    params: StackParams,
    alpha: float = 1.0,
    *,
    total: float | None = None,
    per_unit: torch.Tensor | list[float] | None = None,
) -> torch.Tensor:
    """Scales c (h,) that move the head to the requested Q exactly.

    Args:
        params: head θ.
        alpha: homogeneity degree.
        total: target Σ_k Q_k, reached with one common scale c·I.
        per_unit: target Q_k for every unit (h values).

    Raises:
        ValueError: neither or both targets given, wrong length, or an unreachable target
            (the message names the unit and the reachable interval).
    """
    if (total is None) == (per_unit is None):
        raise ValueError("give exactly one of total=... or per_unit=...")
    a, b = unit_q_terms(params)
    if per_unit is not None:
        t = torch.as_tensor(per_unit, dtype=torch.float64)
        if t.shape != a.shape:
            raise ValueError(f"per_unit needs {a.numel()} targets (one per hidden unit), got {t.numel()}")
        return orbit_scale_for_target(a, b, t, alpha)
    c = orbit_scale_for_target(a.sum(), b.sum(), float(total), alpha)
    return c.expand_as(a).clone()


def scale_params(params: StackParams, c: torch.Tensor, alpha: float) -> StackParams:
    """diag(c)·θ for the head (eq. 22 with π(g) = g^α)."""
    sym = LinearSymmetry((HiddenGroup("scaling", c.numel(), alpha),))
    return sym.act((torch.diag(c.to(params.dtype)),), params)


def apply_unit_scales(model: nn.Module, c: torch.Tensor, *, inplace: bool = False) -> nn.Module:
    """The model with its head moved by g = diag(c) (a deep copy unless ``inplace``)."""
    params, act, alpha = teleport_group(model)
    if c.shape != (params.widths[1],) or not bool((c > 0).all()):
        raise ValueError(f"c must be {params.widths[1]} positive scales, got shape {tuple(c.shape)}")
    moved = scale_params(params, c.to(torch.float64), alpha)
    _check_finite(moved, c, _head_dtype(model))
    target = model if inplace else copy.deepcopy(model)
    load_stack_params(target, moved)
    return target


def _head_dtype(model: nn.Module) -> torch.dtype:
    return module_layers(model)[0][0].weight.dtype


def check_scales(c: torch.Tensor, q_total: float) -> None:
    """Refuse scales that over- or underflowed float64 (a target far out along the orbit)."""
    if bool((torch.isfinite(c) & (c > 0)).all()):
        return
    raise ValueError(
        f"the move needs unit scales c outside the float64 range (got {c.tolist()}): the target "
        f"is too far along the orbit; choose a target Q closer to the current Q = {q_total:.6g}"
    )


def _check_finite(moved: StackParams, c: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse a move whose head weights would not be finite in the model's dtype."""
    if all(bool(torch.isfinite(t.to(dtype)).all()) for t in moved.tensors()):
        return
    raise ValueError(
        f"the move needs unit scales c from {float(c.min()):.3g} to {float(c.max()):.3g}, which make "
        f"the head's {str(dtype).removeprefix('torch.')} weights overflow (non-finite); choose a "
        "target Q closer to the current one"
    )
