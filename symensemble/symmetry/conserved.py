"""Conserved quantities of gradient flow (paper §5, App. C.8–C.9, E.2–F, G.1).

* :func:`q_m` — Q_M(θ) = ⟨θ, M·θ⟩ for M in the Lie algebra (Proposition 5.1).
* :func:`imbalance` — per hidden layer the matrix μ_i = W_i W_iᵀ + b_i b_iᵀ − W_{i+1}ᵀ W_{i+1}
  (App. C.9.1); every entry is conserved for a linear network (Example 5.2).
* :func:`homogeneous_q` — the α-weighted diagonal
  diag(W_i W_iᵀ + b_i b_iᵀ) − α diag(W_{i+1}ᵀ W_{i+1}), conserved by homogeneous activations
  (Example 5.3, App. C.9.3).
* :func:`unit_q` / :func:`unit_q_terms` — that diagonal for one hidden layer, and its two terms.
* :func:`conserved_quantities` — whichever of the above the activations admit, per layer.
* the elementwise Q of eq. 47 (any pointwise σ, whitened input) is in :mod:`.elementwise`.
* :func:`angular_momentum` — ν_i of Theorem 5.2 / App. C.9.5, zero along gradient flow of a
  radial (or linear) network.
* :class:`TwistedQ` and :meth:`TwistedQ.transformed` — the change of Q under the group,
  Q_M(g·θ) = Q_{gᵀMg}(θ) (§5; exactly so for orthogonal g, in twisted form otherwise).

All functions take and return tensors; they are differentiable and keep the input dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .activations import Activation, create_activation
from .groups import group_kind_for_activation
from .linear import LinearSymmetry
from .stack import StackParams

__all__ = [
    "q_m",
    "imbalance",
    "homogeneous_q",
    "unit_q",
    "unit_q_terms",
    "conserved_quantities",
    "total_q",
    "angular_momentum",
    "angular_momentum_residual",
    "TwistedQ",
    "orbit_scale_for_target",
]


# ----------------------------------------------------------------------------------------------
# Linear actions: Q_M and its per-layer forms
# ----------------------------------------------------------------------------------------------


def q_m(params: StackParams, M: Sequence[torch.Tensor], symmetry: LinearSymmetry) -> torch.Tensor:
    """Q_M(θ) = ⟨θ, M·θ⟩ (Proposition 5.1); conserved by gradient flow for symmetric M ∈ 𝔤.

    For antisymmetric M (𝔰𝔬_h) it is identically zero; use :func:`angular_momentum` instead.

    Args:
        params: θ.
        M: one (h_i, h_i) matrix per hidden layer, an element of the Lie algebra of ``symmetry``.
        symmetry: the group acting on θ.

    Returns:
        A scalar tensor.
    """
    return params.inner(symmetry.infinitesimal(M, params))


def _gram_terms(params: StackParams, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_i W_iᵀ + b_i b_iᵀ, W_{i+1}ᵀ W_{i+1}) for hidden layer i (0-based)."""
    W, b, W_next = params.weights[i], params.biases[i], params.weights[i + 1]
    inner = W @ W.T
    if b is not None:
        inner = inner + torch.outer(b, b)
    return inner, W_next.T @ W_next


def imbalance(params: StackParams) -> tuple[torch.Tensor, ...]:
    """μ_i = W_i W_iᵀ + b_i b_iᵀ − W_{i+1}ᵀ W_{i+1} for each hidden layer (App. C.9.1).

    For a linear network every entry of every μ_i is conserved, and
    Q_M = Σ_i Tr(μ_i M_i) for symmetric M (Example 5.2).

    Shape:
        one (n_i, n_i) matrix per hidden layer i = 1 … L−1.
    """
    if params.num_layers < 2:
        raise ValueError("a stack needs at least two layers to have a hidden layer")
    return tuple(a - b for a, b in (_gram_terms(params, i) for i in range(params.num_layers - 1)))


def unit_q_terms(params: StackParams, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_k, b_k) = (|row_k W_i|² + b_{i,k}², |col_k W_{i+1}|²) for each unit k of hidden layer i.

    The two terms of the per-unit quantity Q_k = a_k − α b_k (:func:`unit_q`); under the scaling
    of unit k by c they move as a_k c² and b_k c^{−2α} (:func:`orbit_scale_for_target`).

    Args:
        params: θ.
        layer: hidden layer i (0-based).

    Shape:
        two (n_i,) vectors.
    """
    if not 0 <= layer < params.num_layers - 1:
        raise ValueError(f"hidden layer index {layer} out of range for {params.num_layers} layers")
    W, b, W_next = params.weights[layer], params.biases[layer], params.weights[layer + 1]
    a = W.square().sum(1)
    if b is not None:
        a = a + b.square()
    return a, W_next.square().sum(0)


def unit_q(params: StackParams, alpha: float = 1.0, layer: int = 0) -> torch.Tensor:
    """Q_k = |row_k W_i|² + b_{i,k}² − α |col_k W_{i+1}|² for each unit k of hidden layer i.

    The one implementation of the per-unit quantity; :func:`homogeneous_q` applies it to every
    hidden layer.

    Shape:
        (n_i,).
    """
    a, b = unit_q_terms(params, layer)
    return a - alpha * b


def _is_scalar(x: object) -> bool:
    return isinstance(x, numbers.Real) or getattr(x, "ndim", None) == 0


def homogeneous_q(
    params: StackParams, alphas: float | Sequence[float] = 1.0
) -> tuple[torch.Tensor, ...]:
    """Q_k = |row_k W_i|² + b_{i,k}² − α |col_k W_{i+1}|² per hidden unit (Example 5.3, C.9.3).

    These are Q_{E_kk} = ⟨θ, E_kk·θ⟩ for the positive scaling group with π(g) = g^α.

    Args:
        params: θ.
        alphas: homogeneity degree α per hidden layer, or one real number for all (any
            ``numbers.Real``, e.g. a NumPy scalar, or a 0-d tensor/array).

    Shape:
        one (n_i,) vector per hidden layer.
    """
    L = params.num_layers
    if L < 2:
        raise ValueError("a stack needs at least two layers to have a hidden layer")
    alphas = [float(alphas)] * (L - 1) if _is_scalar(alphas) else [float(a) for a in alphas]
    if len(alphas) != L - 1:
        raise ValueError(f"got {len(alphas)} alphas for {L - 1} hidden layers")
    return tuple(unit_q(params, alpha, i) for i, alpha in enumerate(alphas))


def conserved_quantities(
    params: StackParams, activations: Sequence[Activation | str]
) -> tuple[torch.Tensor | None, ...]:
    """The conserved quantity of each hidden layer that its activation admits.

    * identity → the full matrix μ_i (n_i, n_i) (every entry conserved, GL_h);
    * homogeneous of degree α → the vector of :func:`homogeneous_q` (n_i,);
    * radial → ``None``: 𝔰𝔬_h has no symmetric elements, so there is no Q_M; the conserved
      structure is the angular momentum of :func:`angular_momentum`.

    Raises:
        ValueError: an activation without a continuous linear symmetry (sigmoid, tanh, …).
    """
    acts = [create_activation(a) for a in activations]
    if len(acts) != params.num_layers - 1:
        raise ValueError(f"got {len(acts)} activations for {params.num_layers - 1} hidden layers")
    out: list[torch.Tensor | None] = []
    for i, act in enumerate(acts):
        try:
            kind, alpha = group_kind_for_activation(act)
        except ValueError as err:
            raise ValueError(f"hidden layer {i + 1}: {err}") from None
        if kind == "gl":
            a, b = _gram_terms(params, i)
            out.append(a - b)
        elif kind == "scaling":
            out.append(unit_q(params, alpha, i))
        else:
            out.append(None)
    return tuple(out)


def total_q(params: StackParams, alphas: float | Sequence[float] = 1.0) -> torch.Tensor:
    """Σ_i Σ_k Q_k^{(i)} = Q_M for M = (I, …, I): the sum of :func:`homogeneous_q`.

    Conserved for linear and homogeneous networks; with α = 1 it equals Σ_i Tr μ_i (the
    layer imbalance ‖W_i‖² + ‖b_i‖² − ‖W_{i+1}‖² of Du et al., 2018).
    """
    return torch.stack([q.sum() for q in homogeneous_q(params, alphas)]).sum()


# ----------------------------------------------------------------------------------------------
# Radial networks: angular momentum (Theorem 5.2)
# ----------------------------------------------------------------------------------------------


def angular_momentum(params: StackParams, velocity: StackParams) -> tuple[torch.Tensor, ...]:
    """ν_i = W_i Ẇ_iᵀ − Ẇ_i W_iᵀ + b_i ḃ_iᵀ − ḃ_i b_iᵀ + W_{i+1}ᵀ Ẇ_{i+1} − Ẇ_{i+1}ᵀ W_{i+1}.

    Theorem 5.2 (two layers: V V̇ᵀ − V̇ Vᵀ + UᵀU̇ − U̇ᵀU) and App. C.9.5: along gradient flow
    (velocity θ̇ = −∇L) of a network whose hidden layer i is radial (or linear), ν_i = 0.
    Entry (k, l) is the total angular momentum r²φ̇ of the (k, l) coordinate planes.

    Shape:
        one antisymmetric (n_i, n_i) matrix per hidden layer.
    """
    if params.widths != velocity.widths or params.has_bias != velocity.has_bias:
        raise ValueError(
            f"params and velocity differ in structure: {params.widths} vs {velocity.widths}"
        )
    out = []
    for i in range(params.num_layers - 1):
        W, dW = params.weights[i], velocity.weights[i]
        A = W @ dW.T
        b, db = params.biases[i], velocity.biases[i]
        if b is not None:
            A = A + torch.outer(b, db)  # type: ignore[arg-type]
        A = A + params.weights[i + 1].T @ velocity.weights[i + 1]
        out.append(A - A.T)
    return tuple(out)


def angular_momentum_residual(params: StackParams, grad: StackParams) -> float:
    """Relative size of ν (Theorem 5.2) at θ with θ̇ = −∇L: max|ν_i| / (‖θ‖·‖∇L‖).

    0 up to rounding for radial and linear hidden layers; O(1) when the symmetry is broken.
    """
    nus = angular_momentum(params, grad * -1.0)
    scale = float(params.norm() * grad.norm())
    if scale == 0.0:
        return 0.0
    return max(float(nu.abs().max()) for nu in nus) / scale


# ----------------------------------------------------------------------------------------------
# How Q changes under the group: Q_M(g·θ) = Q_{gᵀMg}(θ)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TwistedQ:
    """Q_{A,B}(θ) = Tr[(V Vᵀ + b bᵀ) A] − Tr[UᵀU B] on a stack with one hidden layer.

    Q_M of Proposition 5.1 is Q_{M, dπ(M)} (eq. 12). Acting with g transforms it as
    Q_{A,B}(g·θ) = Q_{gᵀAg, π(g)⁻¹Bπ(g)⁻ᵀ}(θ) (:meth:`transformed`); for orthogonal g and
    π(g) = g both matrices become gᵀMg, which is the statement Q_M(g·θ) = Q_{gᵀMg}(θ) of §5.

    Attributes:
        A, B: (h, h) matrices.
    """

    A: torch.Tensor
    B: torch.Tensor

    @classmethod
    def from_lie(cls, M: torch.Tensor, symmetry: LinearSymmetry) -> TwistedQ:
        """Q_M as a TwistedQ: A = M, B = dπ(M)."""
        _single_hidden(symmetry)
        return cls(M, symmetry.groups[0].dpi(M))

    def __call__(self, params: StackParams) -> torch.Tensor:
        if params.num_layers != 2:
            raise ValueError(
                f"TwistedQ is defined for one hidden layer (2 layers), got {params.num_layers}"
            )
        inner, outer = _gram_terms(params, 0)
        A, B = self.A.to(params.dtype), self.B.to(params.dtype)
        return (inner * A).sum() - (outer * B).sum()

    def transformed(self, g: torch.Tensor, symmetry: LinearSymmetry) -> TwistedQ:
        """The TwistedQ Q' with Q'(θ) = Q(g·θ) for all θ."""
        grp = _single_hidden(symmetry)
        P_inv = grp.pi_inverse(g)
        return TwistedQ(g.T @ self.A @ g, P_inv @ self.B @ P_inv.T)


def _single_hidden(symmetry: LinearSymmetry):
    if len(symmetry.groups) != 1:
        raise ValueError(
            "the twisted form of Q_M(g.theta) is defined for one hidden layer; for deeper stacks "
            "evaluate q_m(symmetry.act(g, params), M, symmetry) directly"
        )
    return symmetry.groups[0]


# ----------------------------------------------------------------------------------------------
# Reaching a chosen Q along the orbit
# ----------------------------------------------------------------------------------------------


def orbit_scale_for_target(
    a: torch.Tensor, b: torch.Tensor, target: torch.Tensor | float, alpha: float = 1.0
) -> torch.Tensor:
    """c > 0 with Q(c) = a c² − α b c^{−2α} = target, elementwise.

    This is how Q_k = |row_k V|² + b_k² − α|col_k U|² (:func:`homogeneous_q`) moves when hidden
    unit k is scaled by c (V_k ↦ c V_k, b_k ↦ c b_k, U_{:,k} ↦ c^{−α} U_{:,k}), with
    a = |row_k V|² + b_k² ≥ 0 and b = |col_k U|² ≥ 0. Q is strictly increasing in c for α ≠ 0,
    so the solution is unique: closed form for α = 1, bisection on log c otherwise.

    Args:
        a, b: nonnegative tensors of the same shape.
        target: the wanted Q (broadcast).
        alpha: homogeneity degree α (α = −1 for the radial map of Prop. G.2, where
            Q = c²(a + b)).

    Raises:
        ValueError: a target outside the reachable range, naming the entry and the range.
    """
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    t = torch.as_tensor(target, dtype=torch.float64).expand_as(a)
    if bool((a < 0).any() | (b < 0).any()):
        raise ValueError("a and b must be nonnegative (squared norms)")
    if alpha == 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite and nonzero, got {alpha}")
    inf = torch.full_like(a, math.inf)
    if alpha > 0:
        lo = torch.where(b > 0, -inf, torch.zeros_like(a))
        hi = torch.where(a > 0, inf, torch.zeros_like(a))
    else:
        lo = torch.zeros_like(a)
        hi = torch.where(a + b > 0, inf, torch.zeros_like(a))
    degenerate = (lo == hi) & (t == lo)
    bad = ~(((t > lo) & (t < hi)) | degenerate)
    if bool(bad.any()):
        k = int(bad.flatten().nonzero()[0])
        raise ValueError(
            f"target Q = {float(t.flatten()[k]):.6g} is unreachable along the orbit for entry {k}: "
            f"reachable values lie in ({float(lo.flatten()[k]):.6g}, {float(hi.flatten()[k]):.6g}) "
            f"(a = {float(a.flatten()[k]):.4g}, b = {float(b.flatten()[k]):.4g}, alpha = {alpha:g})"
        )
    c2 = _scale_squared(a, b, t, alpha)
    c2 = torch.where(degenerate, torch.ones_like(a), c2)
    return c2.sqrt()


def _scale_squared(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """x = c² solving a x − α b x^{−α} = t (reachable t): closed form for α = 1, bisection on
    log c otherwise."""
    if alpha == 1.0:
        # a x − b/x = t  →  a x² − t x − b = 0; numerically stable roots x = (t + disc)/(2a) = 2b/(disc − t)
        disc = torch.sqrt(t * t + 4 * a * b)
        x_a = torch.where(
            t >= 0, (t + disc) / (2 * a.clamp_min(1e-300)), 2 * b / (disc - t).clamp_min(1e-300)
        )
        x_b = torch.where(b > 0, -b / t.clamp_max(-1e-300), torch.ones_like(a))
        return torch.where(a > 0, x_a, x_b)

    def q(logc: torch.Tensor) -> torch.Tensor:
        return a * torch.exp(2 * logc) - alpha * b * torch.exp(-2 * alpha * logc)

    lo_c, hi_c = torch.full_like(a, -1.0), torch.full_like(a, 1.0)
    for _ in range(200):  # bracket: widen until q(lo) <= t <= q(hi)
        need_lo, need_hi = q(lo_c) > t, q(hi_c) < t
        if not bool(need_lo.any() | need_hi.any()):
            break
        lo_c = torch.where(need_lo, 2 * lo_c, lo_c)
        hi_c = torch.where(need_hi, 2 * hi_c, hi_c)
    for _ in range(200):
        mid = 0.5 * (lo_c + hi_c)
        above = q(mid) > t
        hi_c, lo_c = torch.where(above, mid, hi_c), torch.where(above, lo_c, mid)
    return torch.exp(lo_c + hi_c)
