"""One hidden layer's linear symmetry group G ⊆ GL_h and its representation π (eq. 4, §3.3).

=================  =========================  ===========  ===========
σ                  G                          π(g)         dπ(M)
=================  =========================  ===========  ===========
identity           GL_h (Example 3.2)         g            M
homogeneous, α     positive diagonal T₊(h)    g^α          αM
radial             O(h) (Example 3.5)         g            M
=================  =========================  ===========  ===========

:class:`HiddenGroup` holds the group of one hidden layer (elements, Lie basis, exp, π, dπ);
:func:`group_kind_for_activation` picks the largest one an activation admits. The product over
the hidden layers of a stack, acting on its weights, is :class:`~.linear.LinearSymmetry`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .activations import Activation

__all__ = [
    "GroupKind",
    "KINDS",
    "ALLOWED_SUBGROUPS",
    "GroupElement",
    "HiddenGroup",
    "group_kind_for_activation",
]

GroupKind = Literal["gl", "scaling", "orthogonal"]
KINDS: tuple[str, ...] = ("gl", "scaling", "orthogonal")

#: An element of the product group (or its Lie algebra): one (h_i, h_i) matrix per hidden layer.
GroupElement = tuple[torch.Tensor, ...]

@dataclass(frozen=True)
class HiddenGroup:
    """The symmetry group G ⊆ GL_h acting on one hidden layer, with its representation π.

    Attributes:
        kind: ``"gl"`` (GL_h, π(g) = g), ``"scaling"`` (positive diagonal matrices,
            π(g) = g^α) or ``"orthogonal"`` (O(h), π(g) = g).
        width: h.
        alpha: homogeneity degree α of the activation (only used by ``"scaling"``).
    """

    kind: str
    width: int
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown group kind {self.kind!r}; expected one of {list(KINDS)}")
        if not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"group width must be a positive integer, got {self.width!r}")
        if not math.isfinite(self.alpha) or self.alpha == 0:
            raise ValueError(f"alpha must be finite and nonzero, got {self.alpha}")

    @property
    def name(self) -> str:
        h = self.width
        if self.kind == "gl":
            return f"GL({h})"
        if self.kind == "orthogonal":
            return f"O({h})"
        return f"T+({h}), alpha={self.alpha:g}"

    @property
    def dim(self) -> int:
        """Dimension of the group (= of its Lie algebra): h², h or h(h−1)/2."""
        h = self.width
        return {"gl": h * h, "scaling": h, "orthogonal": h * (h - 1) // 2}[self.kind]

    # -- elements -------------------------------------------------------------------------------
    def identity(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> torch.Tensor:
        return torch.eye(self.width, dtype=dtype, device=device)

    def basis_indices(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, l) of the basis of :meth:`lie_basis`: E_a = E_{k_a l_a} (GL, diagonal) or
        E_{k_a l_a} − E_{l_a k_a} (𝔰𝔬_h, k < l), in the same order."""
        h = self.width
        if self.kind == "gl":
            idx = torch.arange(h * h, device=device)
            return idx // h, idx % h
        if self.kind == "scaling":
            idx = torch.arange(h, device=device)
            return idx, idx
        k, l = torch.triu_indices(h, h, offset=1, device=device)
        return k, l

    def lie_basis(
        self,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        *,
        indices: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """A basis of the Lie algebra 𝔤: E_kl (𝔤𝔩_h), E_kk (diagonal) or E_kl − E_lk, k < l (𝔰𝔬_h).

        Dense: dim·h² entries (h⁴ for GL_h); :meth:`basis_indices` describes it without storage.

        Args:
            dtype, device: of the result.
            indices: only these basis elements (positions in the order of :meth:`basis_indices`).

        Shape:
            (dim, h, h), or (len(indices), h, h).
        """
        k, l = self.basis_indices(device)
        if indices is not None:
            sel = torch.as_tensor(indices, dtype=torch.long, device=k.device)
            k, l = k[sel], l[sel]
        basis = torch.zeros(k.numel(), self.width, self.width, dtype=dtype, device=device)
        idx = torch.arange(k.numel(), device=device)
        basis[idx, k, l] = 1.0
        if self.kind == "orthogonal":
            basis[idx, l, k] = -1.0
        return basis

    def project(self, A: torch.Tensor) -> torch.Tensor:
        """Frobenius-orthogonal projection of (…, h, h) matrices onto 𝔤."""
        if self.kind == "gl":
            return A
        if self.kind == "scaling":
            return torch.diag_embed(torch.diagonal(A, dim1=-2, dim2=-1))
        return 0.5 * (A - A.transpose(-1, -2))

    def random_lie(
        self,
        *,
        scale: float = 1.0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """A Gaussian element of 𝔤 whose entries have standard deviation ``scale``/√h."""
        A = torch.randn(self.width, self.width, generator=generator, dtype=dtype, device=device)
        return self.project(A) * (scale / math.sqrt(self.width))

    def exp(self, M: torch.Tensor) -> torch.Tensor:
        """The exponential map exp: 𝔤 → G (matrix exponential)."""
        if self.kind == "scaling":
            return torch.diag_embed(torch.exp(torch.diagonal(M, dim1=-2, dim2=-1)))
        return torch.linalg.matrix_exp(M)

    def sample(
        self,
        *,
        scale: float = 0.5,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        haar: bool = False,
    ) -> torch.Tensor:
        """A random group element.

        Args:
            scale: spread of exp(M) around the identity (M from :meth:`random_lie`).
            generator: torch RNG.
            haar: O(h) only — draw from the Haar measure of the whole O(h) (both components,
                via a sign-corrected QR decomposition) instead of exp of a random 𝔰𝔬_h element.
        """
        if haar:
            if self.kind != "orthogonal":
                raise ValueError(f"haar sampling is only defined for O(h), not {self.name}")
            A = torch.randn(self.width, self.width, generator=generator, dtype=dtype, device=device)
            Q, R = torch.linalg.qr(A)
            return Q * torch.sign(torch.diagonal(R)).unsqueeze(0)
        return self.exp(self.random_lie(scale=scale, generator=generator, dtype=dtype, device=device))

    def inverse(self, g: torch.Tensor) -> torch.Tensor:
        if self.kind == "scaling":
            return torch.diag_embed(1.0 / torch.diagonal(g, dim1=-2, dim2=-1))
        if self.kind == "orthogonal":
            return g.transpose(-1, -2)
        return torch.linalg.inv(g)

    def membership_error(self, g: torch.Tensor) -> float:
        """How far ``g`` is from G: 0 for members (max-abs violation of the defining equations)."""
        if g.shape[-2:] != (self.width, self.width):
            raise ValueError(
                f"{self.name} elements are ({self.width}, {self.width}) matrices, got {tuple(g.shape)}"
            )
        if self.kind == "gl":
            s = torch.linalg.svdvals(g)
            return float("inf") if s.min() == 0 else 0.0
        if self.kind == "orthogonal":
            eye = torch.eye(self.width, dtype=g.dtype, device=g.device)
            return float((g.transpose(-1, -2) @ g - eye).abs().max())
        diag = torch.diagonal(g, dim1=-2, dim2=-1)
        off = (g - torch.diag_embed(diag)).abs().max()
        return float(off) if bool((diag > 0).all()) else float("inf")

    # -- representation π -----------------------------------------------------------------------
    def pi(self, g: torch.Tensor) -> torch.Tensor:
        """π(g): g for GL and O(h), g^α (entrywise on the positive diagonal) for scaling."""
        if self.kind == "scaling" and self.alpha != 1.0:
            return torch.diag_embed(torch.diagonal(g, dim1=-2, dim2=-1) ** self.alpha)
        return g

    def pi_inverse(self, g: torch.Tensor) -> torch.Tensor:
        """π(g)⁻¹ = π(g⁻¹)."""
        return self.pi(self.inverse(g))

    def dpi(self, M: torch.Tensor) -> torch.Tensor:
        """dπ(M): M, or αM for scaling (Example 5.3)."""
        return self.alpha * M if self.kind == "scaling" else M


def group_kind_for_activation(act: Activation) -> tuple[str, float]:
    """The largest linear symmetry group of eq. 4 that ``act`` admits, as (kind, α).

    Raises:
        ValueError: for activations with no continuous linear symmetry (sigmoid, tanh, relu_sqr, …).
    """
    if act.linear:
        return "gl", 1.0
    if act.radial:
        return "orthogonal", 1.0
    alpha = act.homogeneous_degree
    if alpha is not None and act.pointwise:
        return "scaling", float(alpha)
    raise ValueError(
        f"activation {act.name!r} has no continuous linear symmetry: eq. 4 holds for a continuous "
        "group only when sigma is the identity (GL_h), homogeneous (positive scaling) or radial "
        "(O(h)); use the nonlinear data-dependent action (Theorem 4.1) for it instead"
    )


ALLOWED_SUBGROUPS = {
    "gl": ("gl", "scaling", "orthogonal"),
    "scaling": ("scaling",),
    "orthogonal": ("orthogonal",),
}

