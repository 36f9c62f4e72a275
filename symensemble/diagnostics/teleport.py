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
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..symmetry.activations import Activation
from ..symmetry.conserved import homogeneous_q, orbit_scale_for_target, unit_q_terms
from ..symmetry.linear import (
    HiddenGroup,
    LinearSymmetry,
    StackParams,
    group_kind_for_activation,
    load_stack_params,
    stack_forward,
)
from .common import sigma_derivatives
from .hessian import hvp_fn, lanczos
from .inspection import head_stack

__all__ = [
    "teleport_group",
    "unit_scales_for_q",
    "scale_params",
    "apply_unit_scales",
    "hessian_trace_terms",
    "head_hessian_trace",
    "head_top_eigenvalue",
    "reduce_features",
    "flattest_scales",
    "teleport",
]

log = logging.getLogger(__name__)


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
    target = model if inplace else copy.deepcopy(model)
    load_stack_params(target, scale_params(params, c.to(torch.float64), alpha))
    return target


# ----------------------------------------------------------------------------------------------
# Flatness of the head
# ----------------------------------------------------------------------------------------------


def hessian_trace_terms(
    params: StackParams, act: Activation, features: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Exact per-unit diagonal-block traces of the mean cross-entropy Hessian of the head.

    With logits U σ(Z) + b_U, Z = X Vᵀ + b, p = softmax, H_i = diag(p_i) − p_i p_iᵀ:

    * A_k = Σ_j ∂²L/∂V_kj² + ∂²L/∂b_k² = mean_i (|x_i|² + 1)(σ′(z_ik)² U_kᵀH_iU_k
      + σ″(z_ik) (Uᵀ(p_i − y_i))_k);
    * B_k = Σ_r ∂²L/∂U_rk² = mean_i σ(z_ik)² Σ_r p_ir(1 − p_ir);
    * const = Σ_r ∂²L/∂b_{U,r}² = mean_i Σ_r p_ir(1 − p_ir).

    Shape:
        features (N, d), labels (N,) → A (h,), B (h,), const ().
    """
    V, b, U, bU = params.weights[0], params.biases[0], params.weights[1], params.biases[1]
    X = features.to(params.dtype)
    Z = X @ V.T + (0 if b is None else b)
    S, d1, d2 = sigma_derivatives(act, Z)
    logits = S @ U.T + (0 if bU is None else bU)
    P = torch.softmax(logits, dim=1)
    Yh = F.one_hot(labels, P.shape[1]).to(P.dtype)
    quad = P @ U.square() - (P @ U).square()  # U_kᵀ H_i U_k, (N, h)
    x2 = X.square().sum(1, keepdim=True) + (0.0 if b is None else 1.0)
    A = (x2 * (d1.square() * quad + d2 * ((P - Yh) @ U))).mean(0)
    pdiag = (P * (1 - P)).sum(1, keepdim=True)
    B = (S.square() * pdiag).mean(0)
    const = pdiag.mean() if bU is not None else torch.zeros((), dtype=P.dtype)
    return {"A": A, "B": B, "const": const}


def head_hessian_trace(
    params: StackParams, act: Activation, features: torch.Tensor, labels: torch.Tensor
) -> float:
    """Tr ∇²L over all head parameters, exactly (:func:`hessian_trace_terms`)."""
    t = hessian_trace_terms(params, act, features, labels)
    return float(t["A"].sum() + t["B"].sum() + t["const"])


def _loss_flat(params: StackParams, act: Activation, X: torch.Tensor, y: torch.Tensor):
    def loss(flat: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(stack_forward(params.unflatten(flat), [act], X), y)

    return loss


def reduce_features(params: StackParams, features: torch.Tensor) -> tuple[StackParams, torch.Tensor]:
    """Rotate the head's input space onto the span of the N feature vectors (N < d).

    With Xᵀ = Q R (thin QR, Q ∈ R^{d×N}), the loss depends on V only through X Vᵀ =
    (XQ)(VQ)ᵀ, so the Hessian in the head parameters is Pᵀ H_r P for the orthonormal map
    P: V ↦ VQ, plus exact zeros: the nonzero spectrum (top eigenvalue, trace) is that of the
    small head with features XQ (N × N) and weights VQ (h × N). Returns (θ_r, XQ); unchanged when
    N ≥ d. Scaling a hidden unit commutes with the rotation.
    """
    X = features.to(params.dtype)
    N, d = X.shape
    if N >= d:
        return params, X
    Q, _ = torch.linalg.qr(X.T)  # (d, N)
    V = params.weights[0]
    reduced = StackParams((V @ Q, params.weights[1]), params.biases)
    return reduced, X @ Q


def head_top_eigenvalue(
    params: StackParams,
    act: Activation,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    iters: int = 30,
    seed: int = 0,
) -> float:
    """Largest eigenvalue of the head-parameter Hessian of the mean cross-entropy (Lanczos)."""
    params, X = reduce_features(params, features)
    flat = params.flatten()
    mv = hvp_fn(_loss_flat(params, act, X, labels), flat)
    ritz = lanczos(mv, flat.numel(), iters, generator=torch.Generator().manual_seed(seed), dtype=params.dtype)
    return float(ritz[-1])


def flattest_scales(
    params: StackParams,
    act: Activation,
    alpha: float,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    objective: str = "trace",
    max_evals: int = 40,
    iters: int = 20,
    seed: int = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Scales c minimizing the Hessian trace (closed form) or top eigenvalue (pattern search).

    Returns:
        (c, info) with the objective before and after and the evaluations used.
    """
    if objective not in ("trace", "top"):
        raise ValueError(f"objective must be 'trace' or 'top', got {objective!r}")
    terms = hessian_trace_terms(params, act, features, labels)
    A, B = terms["A"], terms["B"]
    ok = (A > 0) & (B > 0)
    logc = torch.where(
        ok,
        torch.log(A.clamp_min(1e-300) / (alpha * B.clamp_min(1e-300))) / (2 * alpha + 2),
        torch.zeros_like(A),
    )
    info: dict[str, Any] = {
        "objective": objective,
        "trace_before": float(A.sum() + B.sum() + terms["const"]),
        "units_left_unscaled": int((~ok).sum()),
    }
    c = torch.exp(logc)
    info["trace_after"] = float((A / c.square() + B * c ** (2 * alpha)).sum() + terms["const"])
    if objective == "trace":
        return c, info

    small, X_small = reduce_features(params, features)

    def top(lc: torch.Tensor) -> float:
        return head_top_eigenvalue(
            scale_params(small, torch.exp(lc), alpha),
            act,
            X_small,
            labels,
            iters=iters,
            seed=seed,
        )

    info["top_before"] = top(torch.zeros_like(logc))
    best, f_best, evals, step = logc.clone(), top(logc), 2, 0.5
    info["top_at_trace_optimum"] = f_best
    if f_best > info["top_before"]:
        best, f_best = torch.zeros_like(logc), info["top_before"]
    h = logc.numel()
    bar = tqdm(total=max_evals, desc="flattest (top eigenvalue)", disable=not progress)
    bar.update(evals)
    while evals < max_evals and step > 1e-3:
        improved = False
        for k in range(h):
            for sign in (1.0, -1.0):
                if evals >= max_evals:
                    break
                trial = best.clone()
                trial[k] += sign * step
                f = top(trial)
                evals += 1
                bar.update(1)
                if f < f_best:
                    best, f_best, improved = trial, f, True
                    break
        if not improved:
            step /= 2
    bar.close()
    c = torch.exp(best)
    info.update(
        {
            "top_after": f_best,
            "evaluations": evals,
            "trace_after": float((A / c.square() + B * c ** (2 * alpha)).sum() + terms["const"]),
        }
    )
    return c, info


def teleport(
    model: nn.Module,
    *,
    total: float | None = None,
    per_unit: list[float] | None = None,
    flattest: str | None = None,
    features: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    max_evals: int = 40,
    iters: int = 20,
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Move a model's head along its orbit to a chosen Q or to the flattest point found.

    Exactly one of ``total``, ``per_unit`` and ``flattest`` (``"trace"`` or ``"top"``, which
    need ``features`` (N, d) of training images and their ``labels``).

    Returns:
        (a transformed deep copy, report) — the report has the scales c, Q per unit before
        and after (recomputed from the stored weights), the reached-target error and, with
        features, the Hessian trace (and top eigenvalue) before and after.
    """
    if sum(x is not None for x in (total, per_unit, flattest)) != 1:
        raise ValueError("give exactly one of a total target Q, per-unit targets, or flattest=trace|top")
    params, act, alpha = teleport_group(model)
    q_before = homogeneous_q(params, alpha)[0]
    report: dict[str, Any] = {"alpha": alpha, "activation": act.config()}
    if flattest is not None:
        if features is None or labels is None:
            raise ValueError("flattest teleportation needs features and labels of training data")
        c, info = flattest_scales(
            params,
            act,
            alpha,
            features,
            labels,
            objective=flattest,
            max_evals=max_evals,
            iters=iters,
            seed=seed,
            progress=progress,
        )
        report["flatness"] = info
        report["mode"] = f"flattest-{flattest}"
    else:
        c = unit_scales_for_q(params, alpha, total=total, per_unit=per_unit)
        report["mode"] = "target-total" if total is not None else "target-per-unit"
    new = apply_unit_scales(model, c)
    new_params = head_stack(new)[0]
    q_after = homogeneous_q(new_params, alpha)[0]
    report.update(
        {
            "scales": c.tolist(),
            "Q_before": q_before.tolist(),
            "Q_after": q_after.tolist(),
            "Q_total_before": float(q_before.sum()),
            "Q_total_after": float(q_after.sum()),
        }
    )
    if total is not None:
        report["target"] = float(total)
        report["target_abs_error"] = abs(float(q_after.sum()) - float(total))
    if per_unit is not None:
        report["target"] = list(per_unit)
        report["target_abs_error"] = float(
            (q_after - torch.as_tensor(per_unit, dtype=torch.float64)).abs().max()
        )
    if features is not None and labels is not None:
        report["hessian_trace_before"] = head_hessian_trace(params, act, features, labels)
        report["hessian_trace_after"] = head_hessian_trace(new_params, act, features, labels)
    log.info(
        "teleport %s: Q total %.6g -> %.6g",
        report["mode"],
        report["Q_total_before"],
        report["Q_total_after"],
    )
    return new, report
