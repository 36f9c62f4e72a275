"""The π solver of the symmetry ensembles: π(g, H) = σ(H) σ(gH)⁺ (App. I, eqs. 84–85, App. D.4).

The batch version of the nonlinear action (:mod:`.nonlinear`, Theorem 4.1): given the hidden
pre-activations H of s calibration samples, π(g, H) maps σ(gH) back onto σ(H) in the
least-squares sense, so the transformed head (U π(g, H), gV) reproduces the original outputs
on those samples. :mod:`symensemble.ensembles.transforms` builds its nonlinear members on it.

* :func:`pi_matrix` — π(g, H) (and U π solved directly), with its condition number;
* :func:`right_pinv_solve` — X = B A⁺, batched, LU / QR with a minimum-norm fallback;
* :func:`condition_number`, :func:`columnwise` — the helpers the solver and its callers share.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ActivationFn",
    "pi_matrix",
    "PiSolution",
    "right_pinv_solve",
    "condition_number",
    "columnwise",
    "check_square",
]

ActivationFn = Callable[[Tensor], Tensor]


def check_square(g: Tensor, h: int, what: str = "g") -> None:
    """Refuse g unless it has shape (..., h, h) (an element of GL_h)."""
    if g.ndim < 2 or g.shape[-1] != h or g.shape[-2] != h:
        raise ValueError(
            f"{what} must have shape (..., {h}, {h}) (an element of GL_{h}), got {tuple(g.shape)}"
        )


# --------------------------------------------------------------------------------------------
# π(g, H) = σ(H) σ(gH)⁺ (App. I, eqs. 84–85)
# --------------------------------------------------------------------------------------------


def columnwise(sigma: ActivationFn, Z: Tensor) -> Tensor:
    """σ applied to each column of Z (the paper's convention: samples are columns).

    Shape:
        Z (..., h, s) → (..., h, s).
    """
    return sigma(Z.transpose(-1, -2)).transpose(-1, -2)


def condition_number(A: Tensor) -> Tensor:
    """σ_max/σ_min over the min(rows, cols) singular values; ``inf`` for a zero σ_min.

    Shape:
        A (..., m, n) → (...,).
    """
    sv = torch.linalg.svdvals(A)
    smax, smin = sv[..., 0], sv[..., -1]
    return torch.where(
        smin > 0,
        smax / torch.where(smin > 0, smin, torch.ones_like(smin)),
        torch.full_like(smax, math.inf),
    )


def right_pinv_solve(B: Tensor, A: Tensor, *, ridge: float | None = None) -> Tensor:
    """X = B A⁺, the least-squares / minimum-norm solution of X A ≈ B, batched.

    Square A is solved by LU with partial pivoting (the most accurate choice here: the
    residual X A − B stays near eps·cond(A)·|B| even for cond(A) ~ 1e14 in float64); a tall A
    (h × s, s < h) through A = QR, X = (B R⁻¹) Qᵀ; a wide A (s > h) through Aᵀ = QR,
    X = B Q R⁻ᵀ. Batch entries where that factorization breaks down — a zero, tiny
    (|pivot| ≤ max(h, s)·eps·max|pivot|, the usual numerical-rank tolerance) or non-finite pivot,
    or a non-finite result — are rank-deficient and are solved again as the minimum-norm
    least-squares solution B A⁺ (SVD-based: LAPACK ``gelsd`` on the CPU, ``pinv`` elsewhere),
    so the result is finite for finite inputs. With ``ridge`` = λ ≥ 0 the Tikhonov-regularized
    pseudo-inverse A⁺_λ = Q diag(s/(s² + λ s_max²)) Pᵀ is used (from the SVD A = P diag(s) Qᵀ;
    λ is relative to the largest squared singular value), which is defined for rank-deficient
    A as well.

    Args:
        B: (..., m, s) right-hand sides.
        A: (..., h, s).
        ridge: relative ridge λ, or ``None`` for the exact (pseudo-)inverse.

    Shape:
        B (..., m, s), A (..., h, s) → X (..., m, h).
    """
    h, s = A.shape[-2], A.shape[-1]
    if B.shape[-1] != s:
        raise ValueError(f"B has {B.shape[-1]} columns but A has {s}")
    if ridge is not None:
        if not (math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
        P, sv, Qh = torch.linalg.svd(A, full_matrices=False)
        lam = ridge * sv[..., :1].square()
        denom = sv.square() + lam
        inv = torch.where(
            denom > 0,
            sv / torch.where(denom > 0, denom, torch.ones_like(denom)),
            torch.zeros_like(sv),
        )
        return ((B @ Qh.transpose(-1, -2)) * inv.unsqueeze(-2)) @ P.transpose(-1, -2)
    if h == s:
        LU, pivots, info = torch.linalg.lu_factor_ex(A.transpose(-1, -2))
        X = torch.linalg.lu_solve(LU, pivots, B.transpose(-1, -2)).transpose(-1, -2)
        diag = LU.diagonal(dim1=-2, dim2=-1)
        failed = info != 0
    elif s < h:
        Q, R = torch.linalg.qr(A)  # A = Q R, Q (h, s), R (s, s)
        Y = torch.linalg.solve_triangular(R, B, upper=True, left=False)  # Y R = B
        X = Y @ Q.transpose(-1, -2)
        diag = R.diagonal(dim1=-2, dim2=-1)
        failed = torch.zeros(diag.shape[:-1], dtype=torch.bool, device=A.device)
    else:
        Q, R = torch.linalg.qr(A.transpose(-1, -2))  # Aᵀ = Q R, Q (s, h), R (h, h)
        Y = B @ Q  # X Rᵀ = B Q
        X = torch.linalg.solve_triangular(R.transpose(-1, -2), Y, upper=False, left=False)
        diag = R.diagonal(dim1=-2, dim2=-1)
        failed = torch.zeros(diag.shape[:-1], dtype=torch.bool, device=A.device)
    return _min_norm_where_failed(X, B, A, diag, failed)


def _min_norm_where_failed(X: Tensor, B: Tensor, A: Tensor, diag: Tensor, failed: Tensor
                           ) -> Tensor:
    """X with the batch entries whose factorization failed replaced by B A⁺ (minimum norm).

    An entry failed when ``failed`` says so (LU ``info`` ≠ 0), its pivots ``diag`` hold a zero,
    tiny or non-finite value, or its X is not finite. Entries whose A is not finite are left
    as they are (there is no meaningful answer to fall back to).
    """
    h, s = A.shape[-2], A.shape[-1]
    pivots = diag.abs()
    finite_pivots = torch.isfinite(pivots).all(dim=-1)
    tol = max(h, s) * torch.finfo(pivots.dtype).eps * pivots.amax(dim=-1)
    tiny = (pivots <= tol.unsqueeze(-1)).any(dim=-1)
    failed = failed | ~finite_pivots | tiny | ~torch.isfinite(X).all(dim=-1).all(dim=-1)
    batch = X.shape[:-2]
    A_b = A.expand(*batch, h, s)
    failed = failed.expand(batch) & torch.isfinite(A_b).all(dim=-1).all(dim=-1)
    if not bool(failed.any()):
        return X
    B_f = B.expand(*batch, *B.shape[-2:])[failed]
    A_f = A_b[failed]
    if A_f.device.type == "cpu":
        # X A = B  ⇔  Aᵀ Xᵀ = Bᵀ; gelsd returns the minimum-norm least-squares solution
        fix = torch.linalg.lstsq(A_f.transpose(-1, -2), B_f.transpose(-1, -2),
                                 driver="gelsd").solution.transpose(-1, -2)
    else:
        fix = B_f @ torch.linalg.pinv(A_f)
    X = X.clone()
    X[failed] = fix.to(X.dtype)
    return X


class PiSolution(NamedTuple):
    """π(g, H) with (optionally) U π solved directly, and cond(σ(gH))."""

    pi: Tensor
    upper: Tensor | None
    condition: Tensor


def pi_matrix(
    g: Tensor,
    H: Tensor,
    sigma: ActivationFn,
    *,
    U: Tensor | None = None,
    ridge: float | None = None,
    max_condition: float | None = None,
) -> PiSolution:
    """π(g, H) = σ(H) σ(gH)⁺, the batch version of the nonlinear action (App. I, eq. 84).

    With H = V X the hidden pre-activations of s samples (columns), the transformed network
    (U π(g, H), gV) satisfies U π(g, H) σ(gH) = U σ(H) exactly when s ≤ h and σ(gH) has full
    column rank (App. D.4: any two full-rank h × s matrices are related by GL_h), so it
    reproduces the original outputs on those samples. For s > h, π is the least-squares fit.

    Args:
        g: (..., h, h) group elements.
        H: (..., h, s) pre-activations, one sample per column.
        sigma: hidden activation (applied column-wise).
        U: optional (m, h) upper weight; U π is then solved directly (more accurate than
            forming π first when σ(gH) is ill-conditioned).
        ridge: relative ridge for a regularized solve (see :func:`right_pinv_solve`); ``None``
            solves exactly.
        max_condition: without ridge, raise if cond(σ(gH)) exceeds it; default 1/eps of the
            dtype (numerically rank-deficient). Pass ``math.inf`` to only report it: the
            rank-deficient entries then get the minimum-norm solution σ(H) σ(gH)⁺.

    Returns:
        :class:`PiSolution` (pi (..., h, h), upper (..., m, h) or None, condition (...,)).

    Raises:
        ValueError: shape mismatch, or (without ridge) a rank-deficient σ(gH), naming the
            batch index and its condition number.

    Shape:
        g (..., h, h), H (..., h, s) → pi (..., h, h).
    """
    h = H.shape[-2]
    check_square(g, h)
    A = columnwise(sigma, g @ H)
    Bm = columnwise(sigma, H)
    cond = condition_number(A)
    if ridge is None:
        limit = 1.0 / torch.finfo(A.dtype).eps if max_condition is None else float(max_condition)
        bad = ~(cond <= limit)
        if bool(bad.any()):
            idx = tuple(int(i) for i in torch.nonzero(bad)[0]) if bad.ndim else ()
            raise ValueError(
                f"σ(gH) is rank-deficient at batch index {idx}: condition number "
                f"{float(cond[idx]):.3g} > {limit:.3g}; use fewer or distinct samples, a smaller "
                "g, or pass ridge=... for a regularized solve"
            )
    rhs = Bm if U is None else torch.cat([Bm, U @ Bm], dim=-2)
    X = right_pinv_solve(rhs, A, ridge=ridge)
    return PiSolution(X[..., :h, :], None if U is None else X[..., h:, :], cond)
