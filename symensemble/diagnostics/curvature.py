"""Curvature of a head along its scaling orbit: the loss Hessian's trace and top eigenvalue.

The positive scaling g = diag(c) leaves the network function unchanged but not the loss
Hessian: its diagonal blocks scale as H_VV/c_k² and H_UU·c_k^{2α}, so

    Tr H(c) = Σ_k A_k/c_k² + B_k c_k^{2α} + const,

minimized in closed form at c_k^{2α+2} = A_k/(α B_k). :func:`hessian_trace_terms` computes A_k,
B_k exactly for the cross-entropy loss; :func:`head_top_eigenvalue` finds the top eigenvalue by
Lanczos, and :func:`flattest_scales` minimizes either (a pattern search in log c for the top
eigenvalue, started from the trace optimum).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..symmetry.activations import Activation
from ..symmetry.linear import stack_forward
from ..symmetry.stack import StackParams
from .common import sigma_derivatives
from .hessian import hvp_fn, lanczos
from .teleport import scale_params

__all__ = [
    "hessian_trace_terms",
    "head_hessian_trace",
    "head_top_eigenvalue",
    "reduce_features",
    "flattest_scales",
]


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
    V, b, U, bU = params.V, params.b_V, params.U, params.b_U
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
    reduced = StackParams((params.V @ Q, params.U), params.biases)
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

    c, info = _flattest_top(params, act, alpha, features, labels, logc, info, max_evals, iters, seed,
                            progress)
    info["trace_after"] = float((A / c.square() + B * c ** (2 * alpha)).sum() + terms["const"])
    return c, info


def _flattest_top(params: StackParams, act: Activation, alpha: float, features: torch.Tensor,
                  labels: torch.Tensor, logc: torch.Tensor, info: dict[str, Any], max_evals: int, iters: int,
                  seed: int, progress: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """Pattern search in log c for the smallest top eigenvalue, from the trace optimum ``logc``
    (or from c = 1 when that is worse); the head is first reduced to the features' span."""
    small, X_small = reduce_features(params, features)

    def top(lc: torch.Tensor) -> float:
        return head_top_eigenvalue(scale_params(small, torch.exp(lc), alpha), act, X_small, labels,
                                   iters=iters, seed=seed)

    info["top_before"] = top(torch.zeros_like(logc))
    best, f_best = logc.clone(), top(logc)
    info["top_at_trace_optimum"] = f_best
    if f_best > info["top_before"]:
        best, f_best = torch.zeros_like(logc), info["top_before"]
    best, f_best, evals = _pattern_search(top, best, f_best, max_evals, progress)
    info.update({"top_after": f_best, "evaluations": evals})
    return torch.exp(best), info


def _pattern_search(
    f: Any, best: torch.Tensor, f_best: float, max_evals: int, progress: bool, evals: int = 2
) -> tuple[torch.Tensor, float, int]:
    """Coordinate pattern search minimizing ``f`` from ``best``: try ±step on each coordinate,
    move on the first improvement, halve the step when none improves; stops after ``max_evals``
    evaluations (``evals`` already spent) or below step 1e-3. Returns (best, f(best), evals)."""
    step = 0.5
    bar = tqdm(total=max_evals, desc="flattest (top eigenvalue)", disable=not progress)
    bar.update(evals)
    while evals < max_evals and step > 1e-3:
        improved = False
        for k in range(best.numel()):
            for sign in (1.0, -1.0):
                if evals >= max_evals:
                    break
                trial = best.clone()
                trial[k] += sign * step
                value = f(trial)
                evals += 1
                bar.update(1)
                if value < f_best:
                    best, f_best, improved = trial, value, True
                    break
        if not improved:
            step /= 2
    bar.close()
    return best, f_best, evals
