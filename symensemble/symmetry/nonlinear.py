"""The nonlinear, data-dependent action of GL_h on parameter space (paper §4 and App. D).

For common activations σ the linear equivariance σ(gz) = π(g)σ(z) of eq. (4) holds only for a
small subgroup of GL_h. A *data-dependent* action of the whole of GL_h exists whenever σ does
not vanish at nonzero inputs (Theorem 4.1 / D.4). It is built from the matrices R_z of
Proposition D.3: R_z is |z| times a rotation, its first column is z, and R_z⁻¹ = R_zᵀ/|z|².

This module provides

* :func:`R_matrix` — R_z from the spherical coordinates of z (§4, Def. D.1, Prop. D.3);
* :func:`equivariance` — the general equivariance c(g, z) = R_{σ(gz)} R_{σ(z)}⁻¹ (eq. 9, eq. 30);
* :func:`nonlinear_action` — g·(U, V, x) = (U R_{σ(Vx)} R_{σ(gVx)}⁻¹, gV, x) (Theorem 4.1);
* :func:`nonlinear_action_multilayer` — one g per hidden layer of an MLP (Prop. D.5);
  both return the transformed parameters as a :class:`~.stack.StackParams` (batched over x);
* :func:`lipschitz_bound` — the Lipschitz bound of a transformed network (Prop. 4.2).

The least-squares batch version π(g, H) = σ(H) σ(gH)⁺ used by the symmetry ensembles
(App. I, eqs. 84–85) lives in :mod:`.pi_solver`.

Conventions: vectors are the last tensor dimension, matrices the last two, and every function
broadcasts over leading (batch) dimensions. Hidden activations σ act on the last dimension, so
both pointwise activations and radial ones (σ(z) = f(|z|) z) are supported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .activations import activation_lipschitz, activation_nonvanishing
from .pi_solver import ActivationFn, check_square
from .stack import StackParams

__all__ = [
    "R_matrix",
    "R_inverse",
    "equivariance",
    "nonlinear_action",
    "nonlinear_action_multilayer",
    "lipschitz_bound",
]


# --------------------------------------------------------------------------------------------
# R_z (Prop. D.3)
# --------------------------------------------------------------------------------------------


def _check_nonzero(z: Tensor, r: Tensor, what: str) -> None:
    zero = r == 0
    if bool(zero.any()):
        index = [int(i) for i in torch.nonzero(zero)[0]] if zero.ndim else []
        where = f" at batch index {tuple(index)}" if index else ""
        raise ValueError(
            f"{what} needs a nonzero vector, got z = 0{where} (shape {tuple(z.shape)}); R_z is "
            "only defined on R^h \\ {0} (Prop. D.3)"
        )
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"{what} got a vector with non-finite entries (shape {tuple(z.shape)})")


def _scale_of(z: Tensor) -> Tensor:
    """max|z_i| over the last dimension (keepdim), refusing non-float, scalar or zero z.

    R_matrix rescales by it so squares neither overflow nor underflow (R_z is 1-homogeneous).
    """
    if not torch.is_floating_point(z):
        raise ValueError(f"R_matrix expects a floating-point tensor, got dtype {z.dtype}")
    if z.ndim == 0:
        raise ValueError("R_matrix expects vectors of shape (..., h), got a scalar")
    scale = z.abs().amax(dim=-1, keepdim=True)
    _check_nonzero(z, scale.squeeze(-1), "R_matrix")
    return scale


def R_matrix(z: Tensor) -> Tensor:
    """The h×h matrix R_z of §4 / Proposition D.3, batched over leading dimensions.

    With (r, α_1, …, α_{h−1}) the spherical coordinates of z (z_i = r cos α_i ∏_{k<i} sin α_k,
    α_h = 0), R_z = r·R(α_1, …, α_{h−1}) with R(β) the orthogonal matrix of Definition D.1:
    R(β)_{ij} = cos β_{j−1} (∏_{k=j}^{i−1} sin β_k) cos β_i for j ≤ i, −sin β_i for j = i+1, and 0
    otherwise (β_0 = β_h = 0). Hence the first column of R_z is z, R_zᵀR_z = |z|² I, the operator
    norm is |z| and R_z⁻¹ = R_zᵀ/|z|².

    The angles are never formed explicitly: cos α_i = z_i/ρ_i and sin α_i = ρ_{i+1}/ρ_i with
    ρ_i = |(z_i, …, z_h)| the tail norms (ρ_h = z_h keeps the sign of the last coordinate, i.e.
    α_{h−1} ∈ [0, 2π)). This is accurate in float32 and float64 for vectors with zero or
    negative coordinates. Where a tail vanishes (ρ_i = 0) the remaining angles are 0, which
    keeps R(β) orthogonal.

    Args:
        z: nonzero vectors, shape (..., h), h ≥ 1, floating point.

    Returns:
        R_z, shape (..., h, h), same dtype and device as z.

    Raises:
        ValueError: z = 0 (for any batch element), non-finite entries or a non-float dtype.

    Shape:
        z (..., h) → (..., h, h).
    """
    h = z.shape[-1] if z.ndim else 0
    scale = _scale_of(z)
    u = z / scale
    if h == 1:
        return z.unsqueeze(-1)
    # Tail norms ρ_i = |(u_i, ..., u_h)| by a reversed cumulative sum (no cancellation).
    rho = torch.flip(torch.cumsum(torch.flip(u * u, (-1,)), dim=-1), (-1,)).sqrt()
    r = rho[..., :1]
    signed = torch.cat([rho[..., :-1], u[..., -1:]], dim=-1)  # s_i = ρ_i, s_h = u_h (signed)
    head, nxt = signed[..., :-1], signed[..., 1:]
    live = head != 0
    safe = torch.where(live, head, torch.ones_like(head))
    cos = torch.where(live, u[..., :-1] / safe, torch.ones_like(head))  # cos α_1..α_{h-1}
    sin = torch.where(live, nxt / safe, torch.zeros_like(head))  # sin α_1..α_{h-1}
    one = torch.ones_like(u[..., :1])
    cos_i = torch.cat([cos, one], dim=-1)  # cos α_i for rows i = 1..h (α_h = 0)
    cos_prev = torch.cat([one, cos], dim=-1)  # cos α_{j-1} for columns j = 1..h (α_0 = 0)
    # prod[j, i] = ∏_{k=j}^{i-1} sin α_k via a masked cumulative product (exact zeros stay zero).
    k = torch.arange(h - 1, device=z.device)
    j = torch.arange(h, device=z.device)
    factors = torch.where(
        k.unsqueeze(0) >= j.unsqueeze(1), sin.unsqueeze(-2), torch.ones_like(sin).unsqueeze(-2)
    )
    cum = torch.cumprod(factors, dim=-1)  # (..., h[j], h-1[k]): ∏_{k'=j}^{k} sin α_k'
    prod = torch.cat([torch.ones_like(cum[..., :1]), cum], dim=-1)  # (..., j, i): ∏_{k=j}^{i-1}
    lower = cos_i.unsqueeze(-1) * prod.transpose(-1, -2) * cos_prev.unsqueeze(-2)  # (..., i, j)
    R = torch.tril(lower)
    R = R - torch.diag_embed(sin, offset=1)
    return (r * scale).unsqueeze(-1) * R


def R_inverse(z: Tensor) -> Tensor:
    """R_z⁻¹ = R_zᵀ / |z|² (Prop. D.3).

    Shape:
        z (..., h) → (..., h, h).
    """
    R = R_matrix(z)
    norm2 = torch.linalg.vector_norm(z, dim=-1).square()
    return R.transpose(-1, -2) / norm2[..., None, None]


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _activation_name(sigma: ActivationFn) -> str:
    return getattr(sigma, "name", None) or type(sigma).__name__


def _require_nonvanishing(sigma: ActivationFn, what: str) -> None:
    if activation_nonvanishing(sigma) is False:
        raise ValueError(
            f"{what}: activation {_activation_name(sigma)!r} vanishes at nonzero inputs (e.g. "
            "σ(z) = 0 for every z ≤ 0), so the nonlinear action of Theorem D.4 is not defined; "
            "use an activation with σ(z) ≠ 0 for z ≠ 0 (leaky_relu, tanh, sigmoid, radial) or "
            "pass require_nonvanishing=False to act only where σ(Vx) and σ(gVx) happen to be "
            "nonzero"
        )


def _check_locus(value: Tensor, what: str) -> None:
    """Raise if some vector σ(·) is zero: (U, V, x) is off the non-degenerate locus."""
    zero = (value == 0).all(dim=-1)
    if bool(zero.any()):
        index = tuple(int(i) for i in torch.nonzero(zero)[0]) if zero.ndim else ()
        where = f" (batch index {index})" if index else ""
        raise ValueError(
            f"{what} is the zero vector{where}: (U, V, x) is off the non-degenerate locus of "
            "Theorem D.4, where the action needs σ(Vx) ≠ 0 and σ(gVx) ≠ 0 (e.g. ReLU with an "
            "all-negative pre-activation)"
        )


def _matvec(M: Tensor, v: Tensor) -> Tensor:
    return (M @ v.unsqueeze(-1)).squeeze(-1)


# --------------------------------------------------------------------------------------------
# The general equivariance and the two-layer action (eq. 9, Theorem 4.1 / D.4)
# --------------------------------------------------------------------------------------------


def equivariance(g: Tensor, z: Tensor, sigma: ActivationFn) -> Tensor:
    """c(g, z) = R_{σ(gz)} R_{σ(z)}⁻¹, the general equivariance of eq. (9).

    It satisfies c(I, z) = I, the cocycle identity c(g₁, g₂z) c(g₂, z) = c(g₁g₂, z), and
    c(g, z) σ(z) = σ(gz) (eq. 30), wherever σ(z) and σ(gz) are nonzero.

    Args:
        g: (..., h, h) invertible matrices.
        z: (..., h) vectors (pre-activations).
        sigma: the activation, applied to the last dimension.

    Raises:
        ValueError: σ(z) = 0 or σ(gz) = 0.

    Shape:
        g (..., h, h), z (..., h) → (..., h, h).
    """
    check_square(g, z.shape[-1])
    a, b = _sigma_pair(g, z, sigma, "σ(z)", "σ(gz)")
    return R_matrix(b) @ R_inverse(a)


def nonlinear_action(
    U: Tensor,
    V: Tensor,
    x: Tensor,
    g: Tensor,
    sigma: ActivationFn,
    *,
    b_V: Tensor | None = None,
    b_U: Tensor | None = None,
    require_nonvanishing: bool = True,
) -> StackParams:
    """g·(U, V, x) = (U R_{σ(Vx)} R_{σ(gVx)}⁻¹, gV, x), the action of Theorem 4.1 / D.4.

    The network F(x) = U σ(Vx + b_V) + b_U keeps its value at x: with U' = U R_{σ(Vx)}
    R_{σ(gVx)}⁻¹, V' = gV and b_V' = g b_V, U' σ(V'x + b_V') = U σ(Vx + b_V) (the output bias
    b_U is unchanged). It is a group action: the identity acts trivially and (g₁g₂)·θ =
    g₁·(g₂·θ) at the same x. Everything broadcasts over leading dimensions of x and g, so a
    batch of inputs gives a batch of transformed parameters.

    Args:
        U: (m, h) upper weight (or (..., m, h)).
        V: (h, n) lower weight (or (..., h, n)).
        x: (..., n) the data point the action depends on.
        g: (..., h, h) element of GL_h.
        sigma: hidden activation, applied to the last dimension.
        b_V: optional (h,) (or (..., h)) lower bias; the pre-activation is Vx + b_V.
        b_U: optional output bias, carried over unchanged.
        require_nonvanishing: refuse activations known to vanish at nonzero inputs (ReLU).

    Returns:
        The transformed head as a two-layer :class:`~.stack.StackParams`: ``.U`` = U',
        ``.V`` = V', ``.b_V`` = b_V' (``None`` without a bias), ``.b_U`` = b_U.

    Raises:
        ValueError: mismatched shapes; an activation vanishing at nonzero inputs; σ(Vx) = 0 or
            σ(gVx) = 0 (off the non-degenerate locus).

    Shape:
        U (m, h), V (h, n), x (..., n), g (..., h, h) → U' (..., m, h), V' (..., h, n),
        b_V' (..., h).
    """
    _check_head(U, V, x, g, b_V)
    if require_nonvanishing:
        _require_nonvanishing(sigma, "nonlinear_action")
    z = _matvec(V, x) if b_V is None else _matvec(V, x) + b_V
    c_inv = _inverse_equivariance(g, z, sigma)
    return StackParams.two_layer(U @ c_inv, g @ V, None if b_V is None else _matvec(g, b_V), b_U)


def _check_head(U: Tensor, V: Tensor, x: Tensor, g: Tensor, b_V: Tensor | None) -> None:
    """Refuse mismatched shapes of (U, V, x, g, b_V) in :func:`nonlinear_action`."""
    if U.ndim < 2 or V.ndim < 2 or U.shape[-1] != V.shape[-2]:
        raise ValueError(
            f"expected U (m, h) and V (h, n) with matching h, got U {tuple(U.shape)} and "
            f"V {tuple(V.shape)}"
        )
    if x.shape[-1] != V.shape[-1]:
        raise ValueError(
            f"x has {x.shape[-1]} features but V expects {V.shape[-1]} (V {tuple(V.shape)})"
        )
    h = V.shape[-2]
    check_square(g, h)
    if b_V is not None and b_V.shape[-1] != h:
        raise ValueError(f"b_V must have {h} entries, got shape {tuple(b_V.shape)}")


def _inverse_equivariance(g: Tensor, z: Tensor, sigma: ActivationFn) -> Tensor:
    """c(g, z)⁻¹ = R_{σ(z)} R_{σ(gz)}⁻¹ with the locus checks."""
    a, b = _sigma_pair(g, z, sigma, "σ(Vx)", "σ(gVx)")
    return R_matrix(a) @ R_inverse(b)


def _sigma_pair(g: Tensor, z: Tensor, sigma: ActivationFn, what_z: str, what_gz: str
                ) -> tuple[Tensor, Tensor]:
    """(σ(z), σ(gz)), refusing a zero vector in either (off the non-degenerate locus)."""
    a, b = sigma(z), sigma(_matvec(g, z))
    _check_locus(a, what_z)
    _check_locus(b, what_gz)
    return a, b


# --------------------------------------------------------------------------------------------
# Multi-layer action (Prop. D.5)
# --------------------------------------------------------------------------------------------


def nonlinear_action_multilayer(
    params: StackParams,
    x: Tensor,
    gs: Sequence[Tensor],
    activations: Sequence[ActivationFn],
    *,
    require_nonvanishing: bool = True,
) -> StackParams:
    """The action of GL_{n_1} × ⋯ × GL_{n_{L−1}} on an L-layer MLP at x (Prop. D.5).

    With Z_i the pre-activations at x, F̃_i = σ_i(Z_i), g_0 = g_L = I:
    W_i ↦ g_i W_i R_{F̃_{i−1}} R_{σ_{i−1}(g_{i−1} Z_{i−1})}⁻¹ and b_i ↦ g_i b_i for i = 1, …, L
    (for i = 1 the R factor is the identity, σ_0 being the identity on the input). By induction
    the transformed pre-activations are g_i Z_i, so the output at x is unchanged. (The paper
    writes the range i = 1, …, L−1; the last layer is transformed too, with g_L = I.)

    Args:
        params: θ = (W_i, b_i), W_i of shape (n_i, n_{i−1}) (or batched).
        x: (..., n_0) the data point; leading dimensions give batched results.
        gs: g_1, …, g_{L−1}, g_i of shape (..., n_i, n_i) — one per hidden layer.
        activations: σ_1, …, σ_{L−1} (plus optionally σ_L, which is not acted on).
        require_nonvanishing: refuse hidden activations known to vanish at nonzero inputs.

    Returns:
        The transformed θ (same layout; biases ``None`` where absent).

    Raises:
        ValueError: wrong number of g's, shape mismatches, a vanishing activation, or a
            point off the non-degenerate locus (some σ_i(Z_i) = 0 or σ_i(g_i Z_i) = 0).

    Shape:
        W_i (n_i, n_{i−1}), x (..., n_0), g_i (..., n_i, n_i) → W_i' (..., n_i, n_{i−1}).
    """
    acts = _check_multilayer(params, x, gs, activations, require_nonvanishing)
    new_w: list[Tensor] = []
    new_b: list[Tensor | None] = []
    z_prev: Tensor | None = None  # Z_{i-1}
    g_prev: Tensor | None = None
    inp = x
    for i, (W, b) in enumerate(zip(params.weights, params.biases, strict=True), start=1):
        g = gs[i - 1] if i < params.num_layers else None
        if z_prev is None:
            right = W
        else:
            a, bvec = _sigma_pair(g_prev, z_prev, acts[i - 2], f"σ_{i - 1}(Z_{i - 1})",
                                  f"σ_{i - 1}(g_{i - 1} Z_{i - 1})")
            right = W @ (R_matrix(a) @ R_inverse(bvec))
        new_w.append(right if g is None else g @ right)
        new_b.append(None if b is None else (b if g is None else _matvec(g, b)))
        z = _matvec(W, inp) if b is None else _matvec(W, inp) + b
        z_prev, g_prev = z, g
        inp = acts[i - 1](z) if i - 1 < len(acts) else z
    return StackParams(tuple(new_w), tuple(new_b))


def _check_multilayer(
    params: StackParams, x: Tensor, gs: Sequence[Tensor], activations: Sequence[ActivationFn],
    require_nonvanishing: bool,
) -> list[ActivationFn]:
    """Validate the arguments of :func:`nonlinear_action_multilayer`; returns the activations."""
    L = params.num_layers
    acts = params.check_activations(activations)
    if len(gs) != L - 1:
        raise ValueError(
            f"an MLP with {L} layers has {L - 1} hidden layers and needs one g per hidden layer, "
            f"got {len(gs)}"
        )
    for i, (W, g) in enumerate(zip(params.weights[:-1], gs, strict=True), start=1):
        check_square(g, W.shape[-2], f"g_{i}")
        if require_nonvanishing:
            _require_nonvanishing(acts[i - 1], f"nonlinear_action_multilayer (layer {i})")
    if params.weights[0].shape[-1] != x.shape[-1]:
        raise ValueError(f"W_1 expects {params.weights[0].shape[-1]} inputs, x has {x.shape[-1]}")
    return acts


# --------------------------------------------------------------------------------------------
# Lipschitz bound (Prop. 4.2)
# --------------------------------------------------------------------------------------------


def lipschitz_bound(
    U: Tensor,
    V: Tensor,
    x: Tensor,
    g: Tensor,
    sigma: ActivationFn,
    *,
    b_V: Tensor | None = None,
    lipschitz_constant: float | None = None,
) -> Tensor:
    """Lipschitz bound η‖U‖‖V‖‖g‖ |σ(Vx)| / |σ(gVx)| of the transformed network (Prop. 4.2).

    F^{(g,x)}(x̃) = U R_{σ(Vx)} R_{σ(gVx)}⁻¹ σ(gVx̃ + g b_V) + b_U (eq. 8) is Lipschitz with this
    constant; ‖·‖ is the operator (spectral) norm, |·| the Euclidean norm, η the Lipschitz
    constant of σ. The untransformed network has the bound η‖U‖‖V‖.

    Args:
        U, V, x, g, sigma, b_V: as in :func:`nonlinear_action`.
        lipschitz_constant: η; inferred for known activations (see
            :func:`activation_lipschitz`), required otherwise.

    Raises:
        ValueError: η unknown (e.g. relu_sqr, not globally Lipschitz) and not given; off-locus.

    Shape:
        x (..., n), g (..., h, h) → (...,).
    """
    eta = activation_lipschitz(sigma) if lipschitz_constant is None else float(lipschitz_constant)
    if eta is None:
        raise ValueError(
            f"no known global Lipschitz constant for activation {_activation_name(sigma)!r}; "
            "pass lipschitz_constant=η"
        )
    h = V.shape[-2]
    check_square(g, h)
    z = _matvec(V, x) if b_V is None else _matvec(V, x) + b_V
    a, b = _sigma_pair(g, z, sigma, "σ(Vx)", "σ(gVx)")
    op = torch.linalg.matrix_norm
    ratio = torch.linalg.vector_norm(a, dim=-1) / torch.linalg.vector_norm(b, dim=-1)
    return eta * op(U, ord=2) * op(V, ord=2) * op(g, ord=2) * ratio
