"""The elementwise conserved quantity of eq. 47 for any pointwise activation (App. E.2, F).

For the two-layer network W = U σ(V) with whitened input (every entry of V one pre-activation),

    Q = ½ Tr[UᵀU] − Σ_{a,j} ∫₀^{V_aj} σ(x)/σ′(x) dx

is conserved by gradient flow of any loss. :func:`antiderivative_sigma_over_dsigma` computes the
integral in closed form where known (identity, ReLU, LeakyReLU, tanh, sigmoid) or by
Gauss–Legendre quadrature; :func:`elementwise_q` and :func:`elementwise_q_terms` assemble Q.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .activations import Activation, create_activation

__all__ = ["antiderivative_sigma_over_dsigma", "elementwise_q_terms", "elementwise_q"]

_GL_NODES: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _gauss_legendre(
    n: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss–Legendre nodes and weights on [0, 1] (Golub–Welsch)."""
    key = (n, dtype)
    if key not in _GL_NODES:
        k = torch.arange(1, n, dtype=torch.float64)
        beta = k / torch.sqrt(4 * k * k - 1)
        J = torch.diag(beta, 1) + torch.diag(beta, -1)
        x, vecs = torch.linalg.eigh(J)
        w = 2 * vecs[0] ** 2
        _GL_NODES[key] = (((x + 1) / 2).to(dtype), (w / 2).to(dtype))
    t, w = _GL_NODES[key]
    return t.to(device), w.to(device)


def _closed_form(act: Activation) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """F(v) = ∫₀^v σ(x)/σ′(x) dx in closed form, where known."""
    name = act.name
    slope = getattr(act, "negative_slope", 0.0)
    if name == "identity" or (name == "leaky_relu" and slope > 0):
        # σ/σ′ = x on both sides (the slope s cancels)
        return lambda v: 0.5 * v.square()
    if name in ("relu", "leaky_relu"):
        # σ/σ′ = x for x > 0; for x < 0 the unit is dead (σ′ = 0, its entry never moves), and the
        # integral is taken as 0 there (the convention of the paper's code).
        return lambda v: 0.5 * torch.relu(v).square()
    if name == "tanh":
        # σ/σ′ = tanh x cosh² x = sinh x cosh x  →  ½ sinh² v
        return lambda v: 0.5 * torch.sinh(v).square()
    if name == "sigmoid":
        # σ/σ′ = 1/(1 − σ) = 1 + eˣ  →  v + eᵛ − 1
        return lambda v: v + torch.expm1(v)
    return None


def antiderivative_sigma_over_dsigma(
    act: Activation | str, v: torch.Tensor, *, method: str = "auto", nodes: int = 64
) -> torch.Tensor:
    """F(v) = ∫₀^v σ(x)/σ′(x) dx, elementwise (the second term of eq. 47).

    Args:
        act: a pointwise activation.
        v: values (any shape).
        method: ``"closed"`` (identity, ReLU, LeakyReLU, tanh, sigmoid), ``"quadrature"``
            (Gauss–Legendre on [0, v] with σ′ from autograd; any σ with σ′ ≠ 0 on [0, v]) or
            ``"auto"`` (closed form when known).
        nodes: quadrature nodes.

    Raises:
        ValueError: a non-pointwise activation, an unknown method, a closed form requested for
            an activation without one, or σ′ vanishing/changing sign between 0 and v (the
            integral diverges there).
    """
    act = create_activation(act)
    if not act.pointwise:
        raise ValueError(f"eq. 47 needs a pointwise activation; {act.name!r} is not pointwise")
    if method not in ("auto", "closed", "quadrature"):
        raise ValueError(f"method must be 'auto', 'closed' or 'quadrature', got {method!r}")
    closed = _closed_form(act)
    if method == "closed" and closed is None:
        raise ValueError(
            f"no closed form of the integral of sigma/sigma' for {act.name!r}; "
            "use method='quadrature'"
        )
    if closed is not None and method != "quadrature":
        return closed(v)
    t, w = _gauss_legendre(nodes, v.dtype, v.device)
    x = v.unsqueeze(-1) * t
    ends = torch.stack([torch.zeros_like(v), v], dim=-1).detach().requires_grad_(True)
    with torch.enable_grad():
        if not x.requires_grad:
            x.requires_grad_(True)
        s = act(x)
        (ds,) = torch.autograd.grad(s.sum(), x, create_graph=v.requires_grad)
        (ds_ends,) = torch.autograd.grad(act(ends).sum(), ends)
    signs = torch.cat([torch.sign(ds.detach()), torch.sign(ds_ends)], dim=-1)
    bad = (signs == 0).any(-1) | (signs.max(-1).values != signs.min(-1).values)
    bad = bad & (v.detach() != 0)
    if bool(bad.any()):
        first = v.detach()[bad].flatten()[0].item()
        raise ValueError(
            f"sigma' of {act.name!r} vanishes or changes sign between 0 and v = {first:.4g} "
            f"({int(bad.sum())} entries): the integral of sigma/sigma' in eq. 47 diverges there"
        )
    integrand = s / ds
    if not v.requires_grad:
        integrand = integrand.detach()
    return v * (integrand * w).sum(-1)


def elementwise_q_terms(
    U: torch.Tensor, V: torch.Tensor, act: Activation | str, *, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f₁(U), f₂(V)) = (½ Tr UᵀU, Σ_{a,j} ∫₀^{V_aj} σ/σ′) of eq. 47 and App. E.2.

    Shape:
        U (…, m, h), V (…, h, n) → two tensors of shape (…).
    """
    f1 = 0.5 * U.square().sum((-2, -1))
    f2 = antiderivative_sigma_over_dsigma(act, V, method=method).sum((-2, -1))
    return f1, f2


def elementwise_q(
    U: torch.Tensor, V: torch.Tensor, act: Activation | str, *, method: str = "auto"
) -> torch.Tensor:
    """Q = ½ Tr[UᵀU] − Σ_{a,j} ∫₀^{V_aj} σ(x)/σ′(x) dx (eq. 47; App. E.2, F).

    Conserved by gradient flow of any loss of W = U σ(V) — the two-layer network with whitened
    input X = I, where every entry of V is one pre-activation. (With general inputs only the
    linear-symmetry quantities of :func:`conserved_quantities` are conserved.)

    For σ = identity this is ½ Tr[UᵀU − VVᵀ] (eq. 44).

    Args:
        U: output layer (…, m, h).
        V: hidden layer (…, h, n) (the paper's code stores its transpose).
        act: pointwise activation.
        method: see :func:`antiderivative_sigma_over_dsigma`.

    Shape:
        (…,), batched over leading dimensions.
    """
    if U.shape[-1] != V.shape[-2]:
        raise ValueError(
            f"U (..., m, h) and V (..., h, n) disagree on h: {tuple(U.shape)} vs {tuple(V.shape)}"
        )
    f1, f2 = elementwise_q_terms(U, V, act, method=method)
    return f1 - f2
