"""Member transforms of a symmetry ensemble: each draws G pairs (g_k, W_k) for a SymHead.

Every member of an ensemble over the head F(e) = U σ(V e + b_V) + b_U is

    logits_k = W_k σ(g_k H) + b_U,    H = V e + b_V  (B × h pre-activations),

i.e. the head with weights (W_k, g_k V) — for the group action W_k = U π(g_k, H_k) (App. I,
eqs. 84–85). A transform is one small object, chosen by name (:data:`TRANSFORMS`), whose
:meth:`MemberTransform.draw` returns those matrices for all members at once, in float64:

* ``group`` — (U π(g, H_k), gV), π = σ(H_k) σ(gH_k)⁺: the symmetry ensemble.
* ``ginv`` — (U g⁻¹, gV): the linear GL_h action, a baseline.
* ``random`` — (U g′, gV), g′ = I + eps·D, D diagonal with U[0, 1) entries (the paper's text).
* ``random_full`` — (U g′, gV), g′ = I + eps·M, M with U[0, 1) entries (the paper's notebook).
* ``shuffle`` — (U π′, gV), π′ = π(g, H_k) with rows and columns randomly permuted.
* ``perm_interp`` — (U g⁻¹, gV) with g = (I + eps/2·(I + S))/(1 + eps), S a random permutation.
* ``identity`` — (U, V): the original model, G times.

In all but ``identity`` and ``perm_interp``, g = exp(eps·T) with T having i.i.d. N(0, 1/h)
entries: a random element of GL_h reached from I along the Lie algebra gl_h (this follows the
issue and the paper's notebook; the paper's text writes g = I + εM). For eps = 10 these g are
badly conditioned (cond(g) ≈ 1e6–1e12 for h = 16), which is why members are drawn in float64.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..symmetry.pi_solver import ActivationFn, pi_matrix

__all__ = [
    "MemberDraw",
    "MemberTransform",
    "GroupTransform",
    "GInvTransform",
    "RandomTransform",
    "RandomFullTransform",
    "ShuffleTransform",
    "PermInterpTransform",
    "IdentityTransform",
    "TRANSFORMS",
    "create_transform",
    "random_gl",
]

log = logging.getLogger(__name__)

_DTYPE = torch.float64


@dataclass
class MemberDraw:
    """The matrices of G members (float64, CPU).

    Attributes:
        g: (G, h, h) lower action, H ↦ g_k H.
        W: (G, C, h) upper weights W_k = U M_k.
        condition: (G,) cond(σ(g_k H_k)) for transforms that solve for π, else ``None``.
    """

    g: Tensor
    W: Tensor
    condition: Tensor | None = None


def random_gl(num: int, h: int, eps: float, generator: torch.Generator) -> Tensor:
    """g = exp(eps·T), T with i.i.d. N(0, 1/h) entries, in float64 (batched ``matrix_exp``).

    The spectrum of T fills the unit disk (circular law), so ‖g‖ ≈ e^{eps} and
    cond(g) ≈ e^{2·eps} up to non-normality; float64 keeps eps ≤ ~30 finite and meaningful.

    Raises:
        ValueError: exp(eps·T) overflowed (eps far too large).

    Shape:
        → (num, h, h).
    """
    T = torch.randn(num, h, h, generator=generator, dtype=_DTYPE) / math.sqrt(h)
    g = torch.linalg.matrix_exp(eps * T)
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"exp(eps·T) overflowed float64 for eps={eps}; use a much smaller eps")
    return g


def _permutations(num: int, h: int, generator: torch.Generator) -> Tensor:
    """(num, h) independent uniformly random permutations of range(h)."""
    return torch.argsort(torch.rand(num, h, generator=generator, dtype=_DTYPE), dim=-1)


#: from this width on, batched LU runs one matrix at a time: torch's batched CPU LU returns
#: invalid pivots for h ≥ 512 when more than one thread runs (seen with torch 2.14 + oneMKL on 2
#: cores: "Pivots given to lu_solve must all be greater or equal to 1"); one matrix per call is
#: the same factorization.
_BATCHED_LU_MAX_WIDTH = 256


def _right_inverse_apply(U: Tensor, g: Tensor) -> Tensor:
    """U g⁻¹ for a batch of g, by LU solve (no explicit inverse). Shape: (C,h),(G,h,h)→(G,C,h)."""
    Ut = U.transpose(-1, -2)
    if g.shape[-1] > _BATCHED_LU_MAX_WIDTH:
        return torch.stack([torch.linalg.solve(gk.transpose(0, 1), Ut) for gk in g]).transpose(-1, -2)
    return torch.linalg.solve(g.transpose(-1, -2), Ut.expand(g.shape[0], -1, -1)).transpose(-1, -2)


def _solve_pi(g: Tensor, H: Tensor, act: ActivationFn, U: Tensor, ridge: float | None):
    """:func:`~symensemble.symmetry.pi_solver.pi_matrix` (condition only reported), with a
    clear error where σ(g_k H_k) overflowed (enormous pre-activations or eps) instead of
    LAPACK's non-finite-input failure."""
    try:
        return pi_matrix(g, H, act, U=U, ridge=ridge, max_condition=math.inf)
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"π(g_k, H_k) cannot be solved: σ(g_k H_k) is not finite in float64 (calibration "
            f"pre-activations up to {float(H.abs().max()):.3g}, |g_k| up to {float(g.abs().max()):.3g}); "
            f"the pre-activations (or calibration_noise) or eps are far too large ({err})"
        ) from None


class MemberTransform:
    """Base class: draws the members' (g_k, W_k) for a head U σ(·) with one entry point.

    Attributes:
        eps: magnitude of the move in parameter space (≥ 0).
    """

    name: ClassVar[str] = ""
    #: whether :meth:`draw` needs the calibration pre-activations H_k
    uses_calibration: ClassVar[bool] = False

    def __init__(self, eps: float = 10.0) -> None:
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(
                f"{self.name or type(self).__name__} eps must be a finite number >= 0, got {eps!r}"
            )
        self.eps = float(eps)

    def draw(
        self,
        U: Tensor,
        act: ActivationFn,
        num_members: int,
        generator: torch.Generator,
        hidden: Tensor | None = None,
    ) -> MemberDraw:
        """Draw ``num_members`` members.

        Args:
            U: (C, h) upper weight, float64.
            act: the hidden activation σ (acts on the last dimension).
            num_members: G.
            generator: source of randomness (CPU).
            hidden: (G, h, s) calibration pre-activations H_k, float64, for transforms with
                ``uses_calibration``.

        Returns:
            :class:`MemberDraw`.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:g})"


class GroupTransform(MemberTransform):
    """The symmetry ensemble: member k is (U π(g_k, H_k), g_k V) (App. I, eqs. 84–85).

    π(g, H_k) = σ(H_k) σ(g H_k)⁺ is the least-squares solution of π σ(gH_k) = σ(H_k) for the
    member's own calibration pre-activations H_k (h × s). For s ≤ h and σ(g H_k) of full
    column rank the member reproduces the base model's logits on those s images exactly (up
    to ≈ cond(σ(gH_k))·1e-16·|logits| in float64). U π is solved directly
    (:func:`~symensemble.symmetry.pi_solver.right_pinv_solve`).

    Attributes:
        eps: g = exp(eps·T).
        ridge: relative ridge for a regularized solve; ``None`` (default) solves exactly and
            refuses rank-deficient σ(g H_k).
        max_condition: cond(σ(g H_k)) above which a member counts as rank-deficient; default
            1/eps(float64) ≈ 4.5e15 (numerically singular).
        max_redraws: a rank-deficient member is redrawn (new g_k, same images) up to this many
            times before the error — an unlucky g at large eps is redrawn, a degenerate set of
            calibration images (duplicates, a ReLU zeroing whole columns) still fails.
    """

    name = "group"
    uses_calibration = True

    def __init__(
        self,
        eps: float = 10.0,
        ridge: float | None = None,
        max_condition: float | None = None,
        max_redraws: int = 3,
    ) -> None:
        super().__init__(eps)
        if ridge is not None and not (math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge must be None or a finite number >= 0, got {ridge!r}")
        if max_condition is not None and not max_condition > 1:
            raise ValueError(f"max_condition must be > 1, got {max_condition!r}")
        if not isinstance(max_redraws, int) or max_redraws < 0:
            raise ValueError(f"max_redraws must be an integer >= 0, got {max_redraws!r}")
        self.ridge = ridge
        self.max_condition = max_condition
        self.max_redraws = max_redraws

    @property
    def condition_limit(self) -> float:
        return (
            1.0 / torch.finfo(_DTYPE).eps
            if self.max_condition is None
            else float(self.max_condition)
        )

    def _require(self, hidden: Tensor | None, num_members: int, h: int) -> Tensor:
        if (
            hidden is None
            or hidden.ndim != 3
            or hidden.shape[0] != num_members
            or hidden.shape[1] != h
        ):
            got = None if hidden is None else tuple(hidden.shape)
            raise ValueError(
                f"{self.name} needs calibration pre-activations of shape "
                f"({num_members}, {h}, s), got {got}"
            )
        return hidden

    def _solve(
        self,
        U: Tensor,
        act: ActivationFn,
        num_members: int,
        generator: torch.Generator,
        hidden: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Draw g, redraw rank-deficient members; return (g, π, U π, cond).

        π and U π come from :func:`~symensemble.symmetry.pi_solver.pi_matrix`; this method only
        redraws the g_k whose σ(g_k H_k) exceeds the condition limit (without ridge).
        """
        h = U.shape[-1]
        H = self._require(hidden, num_members, h)
        g = random_gl(num_members, h, self.eps, generator)
        # the limit is enforced here, member by member, so pi_matrix only reports cond
        pi, upper, cond = _solve_pi(g, H, act, U, self.ridge)
        if self.ridge is None:
            limit = self.condition_limit
            for attempt in range(self.max_redraws + 1):
                bad = torch.nonzero(~(cond <= limit)).flatten()
                if bad.numel() == 0:
                    break
                if attempt == self.max_redraws:
                    k = int(bad[0])
                    raise ValueError(
                        f"{self.name} member {k}: σ(g_k H_k) is rank-deficient (condition number "
                        f"{float(cond[k]):.3g} > {limit:.3g}) after {self.max_redraws} redraws of "
                        "g_k"
                        f"{f' ({bad.numel()} members affected)' if bad.numel() > 1 else ''}. Its "
                        "calibration images may repeat, or σ may zero whole columns (e.g. ReLU), "
                        "or "
                        "eps may be too large; pass distinct calibration images, a smaller eps or "
                        "samples_per_member, or ridge=1e-12 for a regularized solve"
                    )
                log.warning(
                    "%s: redrawing %d member(s) with rank-deficient σ(g_k H_k) (e.g. member %d, "
                    "condition number %.3g > %.3g)",
                    self.name,
                    bad.numel(),
                    int(bad[0]),
                    float(cond[bad[0]]),
                    limit,
                )
                g[bad] = random_gl(bad.numel(), h, self.eps, generator)
                redo = _solve_pi(g[bad], H[bad], act, U, None)
                pi[bad], upper[bad], cond[bad] = redo.pi, redo.upper, redo.condition
        return g, pi, upper, cond

    def draw(self, U, act, num_members, generator, hidden=None) -> MemberDraw:
        g, _, W, cond = self._solve(U, act, num_members, generator, hidden)
        return MemberDraw(g, W, cond)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(eps={self.eps:g}, ridge={self.ridge}, max_redraws={self.max_redraws})"


class ShuffleTransform(GroupTransform):
    """Baseline: π(g, H_k) with its rows and columns randomly permuted, member (U π′, gV).

    One row and one column permutation per member, fixed until the members are redrawn.
    """

    name = "shuffle"

    def draw(self, U, act, num_members, generator, hidden=None) -> MemberDraw:
        g, pi, _, cond = self._solve(U, act, num_members, generator, hidden)
        h = pi.shape[-1]
        rows = _permutations(num_members, h, generator)
        cols = _permutations(num_members, h, generator)
        shuffled = torch.take_along_dim(pi, rows.unsqueeze(-1), dim=1)
        shuffled = torch.take_along_dim(shuffled, cols.unsqueeze(1), dim=2)
        return MemberDraw(g, U @ shuffled, cond)


class GInvTransform(MemberTransform):
    """Baseline: (U g⁻¹, gV) — the linear GL_h action, a symmetry only for linear σ."""

    name = "ginv"

    def draw(self, U, act, num_members, generator, hidden=None) -> MemberDraw:
        g = random_gl(num_members, U.shape[-1], self.eps, generator)
        return MemberDraw(g, _right_inverse_apply(U, g))


class RandomTransform(MemberTransform):
    """Baseline of the paper's text: (U g′, gV), g′ = I + eps·D with D diagonal, D_ii ~ U[0, 1)."""

    name = "random"

    def draw(self, U, act, num_members, generator, hidden=None) -> MemberDraw:
        h = U.shape[-1]
        g = random_gl(num_members, h, self.eps, generator)
        d = torch.rand(num_members, 1, h, generator=generator, dtype=_DTYPE)
        return MemberDraw(g, U * (1.0 + self.eps * d))


class RandomFullTransform(MemberTransform):
    """Baseline of the paper's notebook: (U g′, gV), g′ = I + eps·M, M_ij ~ U[0, 1)."""

    name = "random_full"

    def draw(self, U, act, num_members, generator, hidden=None) -> MemberDraw:
        h = U.shape[-1]
        g = random_gl(num_members, h, self.eps, generator)
        M = torch.rand(num_members, h, h, generator=generator, dtype=_DTYPE)
        return MemberDraw(g, U @ (torch.eye(h, dtype=_DTYPE) + self.eps * M))


class PermInterpTransform(MemberTransform):
    """Baseline: g = (I + eps/2·(I + S))/(1 + eps), S a random permutation; member (U g⁻¹, gV).

    g interpolates between I (eps = 0) and (I + S)/2 (eps → ∞); it is invertible for eps ≥ 0.
    """

    name = "perm_interp"

    def draw(self, U, act, num_members, generator, hidden=None) -> MemberDraw:
        h = U.shape[-1]
        eye = torch.eye(h, dtype=_DTYPE)
        S = eye[_permutations(num_members, h, generator)]  # (G, h, h) permutation matrices
        g = (eye + 0.5 * self.eps * (eye + S)) / (1.0 + self.eps)
        return MemberDraw(g, _right_inverse_apply(U, g))


class IdentityTransform(MemberTransform):
    """The original model repeated G times: (U, V). Ensembles evaluate it exactly as the model."""

    name = "identity"

    def draw(self, U, act, num_members, generator, hidden=None) -> MemberDraw:
        h = U.shape[-1]
        g = torch.eye(h, dtype=_DTYPE).expand(num_members, h, h).clone()
        return MemberDraw(g, U.expand(num_members, -1, -1).clone())


#: Transforms by name, in the order of the paper's Figure 10 (plus the two extras).
TRANSFORMS: dict[str, type[MemberTransform]] = {
    cls.name: cls
    for cls in (
        GroupTransform,
        GInvTransform,
        RandomTransform,
        RandomFullTransform,
        ShuffleTransform,
        PermInterpTransform,
        IdentityTransform,
    )
}


def create_transform(
    name: str | MemberTransform,
    eps: float = 10.0,
    *,
    ridge: float | None = None,
    max_condition: float | None = None,
    max_redraws: int = 3,
) -> MemberTransform:
    """Build a transform by name; ``ridge``/``max_condition``/``max_redraws`` apply to π-based ones.

    Raises:
        ValueError: unknown name, or a π option given to a transform that does not solve for π.
    """
    if isinstance(name, MemberTransform):
        return name
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; expected one of {list(TRANSFORMS)}")
    cls = TRANSFORMS[name]
    if issubclass(cls, GroupTransform):
        return cls(eps, ridge=ridge, max_condition=max_condition, max_redraws=max_redraws)
    if ridge is not None or max_condition is not None:
        raise ValueError(
            f"ridge and max_condition only apply to the transforms that solve for π "
            f"(group, shuffle), not to {name!r}"
        )
    return cls(eps)
