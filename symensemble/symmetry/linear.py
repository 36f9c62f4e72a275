"""Linear parameter-space symmetries of stacks of Linear layers (paper §3, App. C.4–C.6).

A *stack* is a feedforward network x ↦ W_L σ_{L−1}(… σ_1(W_1 x + b_1) …) + b_L with widths
n = (n_0, …, n_L); its parameters θ = (W_i ∈ R^{n_i×n_{i−1}}, b_i ∈ R^{n_i}) are held in a
:class:`StackParams`. The hidden symmetry group acts on θ by eq. 22,

    g·(W_i, b_i) = (g_i W_i π_{i−1}(g_{i−1})⁻¹, g_i b_i),    g_0 = id, g_L = id,

and its Lie algebra by eq. 23, M·W_i = M_i W_i − W_i dπ_{i−1}(M_{i−1}), M·b_i = M_i b_i. Which
subgroup G_i ⊆ GL_{n_i} leaves the network function unchanged depends on σ_i (eq. 4):

=================  =========================  ===========  ===========
σ_i                G_i                        π(g)         dπ(M)
=================  =========================  ===========  ===========
identity           GL_h (Example 3.2)         g            M
homogeneous, α     positive diagonal T₊(h)    g^α          αM
radial             O(h) (Example 3.5)         g            M
=================  =========================  ===========  ===========

Sigmoid, tanh and other activations have no continuous linear symmetry; asking for one raises a
``ValueError`` that points at the nonlinear, data-dependent action instead.

Group elements are tuples of dense (h_i, h_i) matrices, one per hidden layer; Lie algebra elements
are tuples of (h_i, h_i) matrices too. Everything is vectorized over the Lie-algebra basis, so the
tangent space {M·θ} of an orbit is one matrix product per layer
(:meth:`LinearSymmetry.tangent_vectors`).

Example::

    head = model.head                                 # SymHead: V → σ → U
    sym = LinearSymmetry.for_module(head)             # T₊(16) for LeakyReLU
    g = sym.sample(generator=torch.Generator().manual_seed(0))
    new_head = transform_module(head, g, sym)         # a transformed copy, same function
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .activations import Activation, create_activation
from .stack import StackParams

__all__ = [
    "GroupKind",
    "StackParams",
    "HiddenGroup",
    "LinearSymmetry",
    "stack_forward",
    "module_layers",
    "stack_params",
    "load_stack_params",
    "transform_module",
    "group_kind_for_activation",
    "orbit_dimension_formula",
    "paper_orbit_dimension",
]

GroupKind = Literal["gl", "scaling", "orthogonal"]
_KINDS: tuple[str, ...] = ("gl", "scaling", "orthogonal")


def stack_forward(params: StackParams, activations: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The feedforward function F_θ(x) of App. C.2, with no output activation
    (:meth:`StackParams.forward` with exactly L − 1 hidden activations).

    Shape:
        x (B, n_0) → (B, n_L).
    """
    if len(activations) != params.num_layers - 1:
        raise ValueError(
            f"a stack of {params.num_layers} layers needs {params.num_layers - 1} hidden "
            f"activations, got {len(activations)}"
        )
    return params.forward(x, activations)


# ----------------------------------------------------------------------------------------------
# One hidden layer's group
# ----------------------------------------------------------------------------------------------


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
        if self.kind not in _KINDS:
            raise ValueError(f"unknown group kind {self.kind!r}; expected one of {list(_KINDS)}")
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


_ALLOWED_SUBGROUPS = {
    "gl": ("gl", "scaling", "orthogonal"),
    "scaling": ("scaling",),
    "orthogonal": ("orthogonal",),
}


# ----------------------------------------------------------------------------------------------
# The product group acting on a whole stack
# ----------------------------------------------------------------------------------------------

GroupElement = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class LinearSymmetry:
    """G = G_1 × … × G_{L−1} acting on a stack by eq. 22 (its Lie algebra by eq. 23).

    Attributes:
        groups: one :class:`HiddenGroup` per hidden layer.

    Elements g and Lie-algebra elements M are tuples of (h_i, h_i) matrices, one per hidden layer.
    """

    groups: tuple[HiddenGroup, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        if not self.groups:
            raise ValueError("a LinearSymmetry needs at least one hidden layer (a stack of >= 2 layers)")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def for_activations(
        cls,
        activations: Sequence[Activation | str],
        hidden_widths: Sequence[int],
        kinds: Sequence[str | None] | str | None = None,
    ) -> LinearSymmetry:
        """The symmetry group determined by the hidden activations (Examples 3.2–3.5).

        Args:
            activations: σ_1 … σ_{L−1}, as registry names or :class:`Activation` instances.
            hidden_widths: n_1 … n_{L−1}.
            kinds: optionally a subgroup per layer (or one for all): a linear layer accepts
                ``"gl"``, ``"scaling"`` or ``"orthogonal"``; other activations only their own.

        Raises:
            ValueError: an activation without a continuous linear symmetry, a subgroup that is
                not a symmetry of that activation, or mismatched lengths.
        """
        acts = [create_activation(a) for a in activations]
        widths = [int(w) for w in hidden_widths]
        if len(acts) != len(widths):
            raise ValueError(f"got {len(acts)} activations for {len(widths)} hidden layers")
        if kinds is None or isinstance(kinds, str):
            kinds = [kinds] * len(acts)
        if len(kinds) != len(acts):
            raise ValueError(f"got {len(kinds)} group kinds for {len(acts)} hidden layers")
        groups = []
        for i, (act, h, want) in enumerate(zip(acts, widths, kinds, strict=True)):
            try:
                kind, alpha = group_kind_for_activation(act)
            except ValueError as err:
                raise ValueError(f"hidden layer {i + 1}: {err}") from None
            if want is not None:
                if want not in _ALLOWED_SUBGROUPS[kind]:
                    raise ValueError(
                        f"hidden layer {i + 1}: group {want!r} is not a symmetry of activation "
                        f"{act.name!r} (allowed: {list(_ALLOWED_SUBGROUPS[kind])})"
                    )
                kind = want
            groups.append(HiddenGroup(kind, h, alpha))
        return cls(tuple(groups))

    @classmethod
    def for_module(cls, module: nn.Module, kinds: Sequence[str | None] | str | None = None) -> LinearSymmetry:
        """The symmetry of a SymModel, SymHead or ``nn.Sequential(Linear, σ, …, Linear)``."""
        linears, acts = module_layers(module)
        return cls.for_activations(acts, [lin.out_features for lin in linears[:-1]], kinds)

    # -- structure ---------------------------------------------------------------------------
    @property
    def hidden_widths(self) -> tuple[int, ...]:
        return tuple(g.width for g in self.groups)

    @property
    def dim(self) -> int:
        """dim G = Σ_i dim G_i."""
        return sum(g.dim for g in self.groups)

    def _check(self, params: StackParams) -> None:
        if params.hidden_widths != self.hidden_widths:
            raise ValueError(
                f"symmetry acts on hidden widths {self.hidden_widths} but the stack has hidden "
                f"widths {params.hidden_widths} (widths {params.widths})"
            )

    def _check_element(self, g: Sequence[torch.Tensor], what: str = "group element") -> None:
        if len(g) != len(self.groups):
            raise ValueError(
                f"a {what} has one matrix per hidden layer: expected {len(self.groups)}, got {len(g)}"
            )
        for i, (gi, grp) in enumerate(zip(g, self.groups, strict=True)):
            if tuple(gi.shape) != (grp.width, grp.width):
                raise ValueError(
                    f"{what} entry {i + 1} must be ({grp.width}, {grp.width}), got {tuple(gi.shape)}"
                )

    # -- group structure ----------------------------------------------------------------------
    def identity(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> GroupElement:
        return tuple(grp.identity(dtype, device) for grp in self.groups)

    def sample(
        self,
        *,
        scale: float = 0.5,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        haar: bool = False,
    ) -> GroupElement:
        """A random element (see :meth:`HiddenGroup.sample`)."""
        return tuple(
            grp.sample(scale=scale, generator=generator, dtype=dtype, device=device, haar=haar)
            for grp in self.groups
        )

    def random_lie(
        self,
        *,
        scale: float = 1.0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> GroupElement:
        return tuple(
            grp.random_lie(scale=scale, generator=generator, dtype=dtype, device=device)
            for grp in self.groups
        )

    def compose(self, g1: Sequence[torch.Tensor], g2: Sequence[torch.Tensor]) -> GroupElement:
        """g1 g2 (acting as g1·(g2·θ))."""
        self._check_element(g1)
        self._check_element(g2)
        return tuple(a @ b for a, b in zip(g1, g2, strict=True))

    def inverse(self, g: Sequence[torch.Tensor]) -> GroupElement:
        self._check_element(g)
        return tuple(grp.inverse(gi) for grp, gi in zip(self.groups, g, strict=True))

    def exp(self, M: Sequence[torch.Tensor]) -> GroupElement:
        self._check_element(M, "Lie algebra element")
        return tuple(grp.exp(Mi) for grp, Mi in zip(self.groups, M, strict=True))

    def membership_error(self, g: Sequence[torch.Tensor]) -> float:
        self._check_element(g)
        return max(grp.membership_error(gi) for grp, gi in zip(self.groups, g, strict=True))

    # -- actions ------------------------------------------------------------------------------
    def act(self, g: Sequence[torch.Tensor], params: StackParams) -> StackParams:
        """g·θ, eq. 22: W_i ↦ g_i W_i π_{i−1}(g_{i−1})⁻¹, b_i ↦ g_i b_i.

        ``g`` is cast to the parameters' dtype and device.
        """
        self._check(params)
        self._check_element(g)
        g = [gi.to(dtype=params.dtype, device=params.device) for gi in g]
        L = params.num_layers
        weights, biases = [], []
        for i in range(L):  # layer i+1 in the paper's 1-based numbering
            W, b = params.weights[i], params.biases[i]
            if i < L - 1:
                W = g[i] @ W
                b = None if b is None else g[i] @ b
            if i > 0:
                W = W @ self.groups[i - 1].pi_inverse(g[i - 1])
            weights.append(W)
            biases.append(b)
        return StackParams(tuple(weights), tuple(biases))

    def infinitesimal(self, M: Sequence[torch.Tensor], params: StackParams) -> StackParams:
        """M·θ, eq. 23: M·W_i = M_i W_i − W_i dπ_{i−1}(M_{i−1}), M·b_i = M_i b_i.

        Linear in M; the biases of the output layer and the input side of W_1 are untouched.
        """
        self._check(params)
        self._check_element(M, "Lie algebra element")
        M = [Mi.to(dtype=params.dtype, device=params.device) for Mi in M]
        L = params.num_layers
        weights, biases = [], []
        for i in range(L):
            W, b = params.weights[i], params.biases[i]
            dW = torch.zeros_like(W)
            db = None if b is None else torch.zeros_like(b)
            if i < L - 1:
                dW = dW + M[i] @ W
                db = None if b is None else M[i] @ b
            if i > 0:
                dW = dW - W @ self.groups[i - 1].dpi(M[i - 1])
            weights.append(dW)
            biases.append(db)
        return StackParams(tuple(weights), tuple(biases))

    def tangent_vectors(self, params: StackParams, max_entries: float = 2e8) -> torch.Tensor:
        """The infinitesimal action of every Lie-algebra basis element, flattened.

        Row k is (E_k·θ).flatten() for the k-th basis element E_k of 𝔤 = 𝔤_1 × … × 𝔤_{L−1}
        (layer-1 basis first). The rows span the tangent space of the orbit G·θ.

        Built by indexing (the basis elements E_kl, E_kk or E_kl − E_lk are never materialized),
        so memory is that of the result; above ``max_entries`` it raises and points at
        ``orbit_dimension(method="gram")``.

        Shape:
            (dim G, d).
        """
        self._check(params)
        size = self.dim * params.numel
        if size > max_entries:
            raise ValueError(
                f"the tangent matrix would have {self.dim} x {params.numel} = {size:.3g} entries "
                f"(> max_entries = {max_entries:.3g}); for one hidden layer use "
                "orbit_dimension(params, method='gram')"
            )
        offsets, pos = [], 0
        for t in params.tensors():
            offsets.append(pos)
            pos += t.numel()
        d = pos
        # index of W_i and b_i in the flattened vector
        slot, k = [], 0
        for b in params.biases:
            slot.append((offsets[k], None if b is None else offsets[k + 1]))
            k += 1 if b is None else 2
        rows = []
        for i, grp in enumerate(self.groups):
            k, l = grp.basis_indices(params.device)  # E_a = E_{k_a l_a} (− E_{l_a k_a} for 𝔰𝔬_h)
            D, a = k.numel(), torch.arange(k.numel(), device=params.device)
            W_in, b_in, W_out = params.weights[i], params.biases[i], params.weights[i + 1]
            c = grp.alpha if grp.kind == "scaling" else 1.0  # dπ(E) = c E
            # E_kl W puts row l of W into row k; W E_kl puts column k of W into column l
            t_in = torch.zeros(D, *W_in.shape, dtype=params.dtype, device=params.device)
            t_in[a, k] = W_in[l]
            t_out = torch.zeros(D, *W_out.shape, dtype=params.dtype, device=params.device)
            t_out[a, :, l] = -c * W_out[:, k].T
            t_b = None
            if b_in is not None:
                t_b = torch.zeros(D, b_in.numel(), dtype=params.dtype, device=params.device)
                t_b[a, k] = b_in[l]
            if grp.kind == "orthogonal":  # the − E_lk half
                t_in[a, l] -= W_in[k]
                t_out[a, :, k] += c * W_out[:, l].T
                if t_b is not None:
                    t_b[a, l] -= b_in[k]
            out = torch.zeros(D, d, dtype=params.dtype, device=params.device)
            w_off, b_off = slot[i]
            out[:, w_off : w_off + W_in.numel()] = t_in.reshape(D, -1)
            if t_b is not None:
                out[:, b_off : b_off + b_in.numel()] = t_b
            w2_off = slot[i + 1][0]
            out[:, w2_off : w2_off + W_out.numel()] = t_out.reshape(D, -1)
            rows.append(out)
        return torch.cat(rows, dim=0)

    def orbit_dimension(self, params: StackParams, rtol: float | None = None, method: str = "auto") -> int:
        """dim G·θ = rank of {M·θ : M ∈ 𝔤}, the numerical rank of :meth:`tangent_vectors`.

        Args:
            params: θ.
            rtol: relative threshold. ``"svd"``: singular values below ``rtol · s_max`` count as
                zero, default max(dim G, d)·eps (as ``numpy.linalg.matrix_rank``). ``"gram"``:
                Gram eigenvalues below ``rtol · λ_max`` count as zero, default dim G · eps.
            method: ``"svd"`` of the (dim G, d) tangent matrix (any depth); ``"gram"`` — the
                spectrum of the Gram operator N ↦ P_𝔤(N S + dπ*(R) N) with S = VVᵀ + bbᵀ and
                R = UᵀU, in closed form per group (one hidden layer only; O(h³), independent
                of the input width, for large heads); ``"auto"`` picks ``"gram"`` when the
                stack has one hidden layer.
        """
        if method not in ("auto", "svd", "gram"):
            raise ValueError(f"method must be 'auto', 'svd' or 'gram', got {method!r}")
        self._check(params)
        if method == "auto":
            method = "gram" if len(self.groups) == 1 else "svd"
        if method == "gram":
            return self._orbit_dimension_gram(params, rtol)
        T = self.tangent_vectors(params)
        s = torch.linalg.svdvals(T)
        if s.numel() == 0 or float(s[0]) == 0.0:
            return 0
        if rtol is None:
            rtol = max(T.shape) * torch.finfo(T.dtype).eps
        return int((s > rtol * s[0]).sum())

    def _orbit_dimension_gram(self, params: StackParams, rtol: float | None) -> int:
        if len(self.groups) != 1:
            raise ValueError("the 'gram' orbit dimension needs a stack with one hidden layer")
        grp = self.groups[0]
        W, b, U = params.weights[0], params.biases[0], params.weights[1]
        S = W @ W.T + (0 if b is None else torch.outer(b, b))
        R = U.T @ U
        # ⟨M·θ, N·θ⟩ = Tr(Mᵀ N S) + Tr(dπ(M)ᵀ R dπ(N)): the Gram operator's spectrum per group
        if grp.kind == "gl":
            ev = torch.linalg.eigvalsh(S)[:, None] + torch.linalg.eigvalsh(R)[None, :]
        elif grp.kind == "scaling":
            ev = torch.diagonal(S) + grp.alpha**2 * torch.diagonal(R)
        else:
            lam = torch.linalg.eigvalsh(S + R)
            i, j = torch.triu_indices(lam.numel(), lam.numel(), offset=1)
            ev = 0.5 * (lam[i] + lam[j])
        ev = ev.flatten()
        top = float(ev.abs().max()) if ev.numel() else 0.0
        if top == 0.0:
            return 0
        if rtol is None:
            rtol = max(ev.numel(), 1) * torch.finfo(ev.dtype).eps
        return int((ev > rtol * top).sum())

    def action_matrix(self, g: Sequence[torch.Tensor], params: StackParams) -> torch.Tensor:
        """The (d, d) matrix of the linear map θ ↦ g·θ in flattened coordinates (for small d)."""
        d = params.numel
        eye = torch.eye(d, dtype=params.dtype, device=params.device)
        return torch.stack([self.act(g, params.unflatten(e)).flatten() for e in eye], dim=1)

    def lie_matrix(self, M: Sequence[torch.Tensor], params: StackParams) -> torch.Tensor:
        """The (d, d) matrix of θ ↦ M·θ in flattened coordinates (for small d)."""
        d = params.numel
        eye = torch.eye(d, dtype=params.dtype, device=params.device)
        return torch.stack([self.infinitesimal(M, params.unflatten(e)).flatten() for e in eye], dim=1)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

_TORCH_ACTIVATIONS: dict[type[nn.Module], Callable[[nn.Module], Activation]] = {
    nn.Identity: lambda m: create_activation("identity"),
    nn.ReLU: lambda m: create_activation("relu"),
    nn.LeakyReLU: lambda m: create_activation("leaky_relu", negative_slope=m.negative_slope),  # type: ignore[attr-defined]
    nn.Tanh: lambda m: create_activation("tanh"),
    nn.Sigmoid: lambda m: create_activation("sigmoid"),
}


def _as_activation(module: nn.Module, where: str) -> Activation:
    if isinstance(module, Activation):
        return module
    for cls, build in _TORCH_ACTIVATIONS.items():
        if type(module) is cls:
            return build(module)
    raise ValueError(
        f"{where}: {type(module).__name__} is not a known activation; use a symensemble "
        "Activation (create_activation) or nn.Identity/ReLU/LeakyReLU/Tanh/Sigmoid"
    )


def module_layers(module: nn.Module) -> tuple[list[nn.Linear], list[Activation]]:
    """The Linear layers and hidden activations of a SymModel, SymHead or MLP.

    Accepted: a model with a ``head`` that is a :class:`~symensemble.models.SymHead`; a SymHead
    (V → σ → U); an ``nn.Sequential`` alternating Linear and activation modules, starting and
    ending with Linear.

    Raises:
        ValueError: anything else, naming what was found and what is expected.
    """
    from ..models.head import SymHead  # local import: models imports symmetry.activations

    head = getattr(module, "head", None)
    if (
        not isinstance(module, SymHead)
        and isinstance(head, nn.Module)
        and not isinstance(module, nn.Sequential)
    ):
        if not isinstance(head, SymHead):
            raise ValueError(
                f"{type(module).__name__}.head is a {type(head).__name__}, not a SymHead; "
                "the linear symmetries act on a Linear → sigma → Linear head"
            )
        module = head
    if isinstance(module, SymHead):
        return [module.V, module.U], [module.act]
    if isinstance(module, nn.Sequential):
        layers = list(module)
        if len(layers) < 3 or len(layers) % 2 == 0:
            raise ValueError(
                "an MLP must be nn.Sequential(Linear, act, Linear, ..., Linear) with an odd "
                f"number >= 3 of modules, got {len(layers)}"
            )
        linears, acts = [], []
        for j, layer in enumerate(layers):
            if j % 2 == 0:
                if not isinstance(layer, nn.Linear):
                    raise ValueError(f"MLP module {j} must be nn.Linear, got {type(layer).__name__}")
                linears.append(layer)
            else:
                acts.append(_as_activation(layer, f"MLP module {j}"))
        return linears, acts
    raise ValueError(
        f"cannot find a stack of Linear layers in {type(module).__name__}: expected a SymModel "
        "(with a SymHead .head), a SymHead, or nn.Sequential(Linear, act, ..., Linear)"
    )


def stack_params(module: nn.Module, dtype: torch.dtype | None = torch.float64) -> StackParams:
    """θ of a SymModel/SymHead/MLP as a detached :class:`StackParams` (float64 by default)."""
    return StackParams.from_linears(module_layers(module)[0], dtype=dtype)


def load_stack_params(module: nn.Module, params: StackParams) -> None:
    """Copy θ into the Linear layers of ``module`` (in place, cast to each parameter's dtype)."""
    params.copy_to(module_layers(module)[0])


def transform_module(
    module: nn.Module,
    g: Sequence[torch.Tensor],
    symmetry: LinearSymmetry | None = None,
    *,
    inplace: bool = False,
) -> nn.Module:
    """Apply g ∈ G to a SymModel, SymHead or MLP (eq. 22); the network function is unchanged.

    The action is computed in float64 and cast back to each parameter's dtype.

    Args:
        module: the network (left untouched unless ``inplace``).
        g: one (h_i, h_i) matrix per hidden layer.
        symmetry: the group; default :meth:`LinearSymmetry.for_module`.
        inplace: modify ``module`` itself instead of a deep copy.

    Returns:
        The transformed module (``module`` itself when ``inplace``).
    """
    symmetry = symmetry or LinearSymmetry.for_module(module)
    target = module if inplace else copy.deepcopy(module)
    params = stack_params(target)
    load_stack_params(target, symmetry.act([gi.to(torch.float64) for gi in g], params))
    return target


# ----------------------------------------------------------------------------------------------
# Orbit dimension (Theorem 3.3, Proposition C.3, Corollary C.4)
# ----------------------------------------------------------------------------------------------


def _check_dims(n: int, h: int, m: int) -> None:
    for label, v in (("n", n), ("h", h), ("m", m)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{label} must be a positive integer, got {v!r}")


def orbit_dimension_formula(kind: str, n: int, h: int, m: int, *, bias: bool = False) -> int:
    """Dimension of a generic orbit of a two-layer network (n inputs, h hidden, m outputs).

    The dimension is dim G − dim Stab_G(U, V); the stabilizer's Lie algebra is
    {M ∈ 𝔤 : MV = 0, U dπ(M) = 0}. At a generic point (full-rank U, V, no zero rows):

    * GL_h (Proposition C.3): h² − max(0, h − n)·max(0, h − m).
    * positive scaling: M = diag(d) must vanish on every unit with a nonzero row of V, so the
      stabilizer is trivial and the orbit has dimension h.
    * O(h): M ∈ 𝔰𝔬_h must kill col(V) and col(Uᵀ), a generic subspace of dimension
      min(h, n + m), so the orbit has dimension C(h, 2) − C(max(0, h − n − m), 2).

    The GL formula is the paper's; for scaling and O(h) these are the generic values, which
    differ from Theorem 3.3 / Corollary C.4 when h > max(n, m) — see
    :func:`paper_orbit_dimension`. A hidden bias acts like one more input column (n → n + 1).

    Args:
        kind: ``"gl"``, ``"scaling"`` or ``"orthogonal"``.
        n, h, m: input, hidden and output widths.
        bias: whether the hidden layer has a bias.
    """
    _check_dims(n, h, m)
    if kind not in _KINDS:
        raise ValueError(f"unknown group kind {kind!r}; expected one of {list(_KINDS)}")
    n_eff = n + 1 if bias else n
    if kind == "gl":
        return h * h - max(0, h - n_eff) * max(0, h - m)
    if kind == "scaling":
        return h
    return math.comb(h, 2) - math.comb(max(0, h - n_eff - m), 2)


def paper_orbit_dimension(kind: str, n: int, h: int, m: int) -> int:
    """The orbit dimension as tabulated in Theorem 3.3 / Corollary C.4 (no biases).

    GL: h² − max(0, h − n)·max(0, h − m); scaling: min(h, max(n, m)); O(h): C(h, 2) if
    h ≤ max(n, m) else C(h, 2) − C(h − max(n, m), 2). The last two are the stabilizer dimensions
    at the special point U₀ = [I 0], V₀ = [I; 0] of the proof, which is not generic for these
    subgroups; :func:`orbit_dimension_formula` gives the generic values (they agree whenever
    h ≤ max(n, m)).
    """
    _check_dims(n, h, m)
    if kind not in _KINDS:
        raise ValueError(f"unknown group kind {kind!r}; expected one of {list(_KINDS)}")
    if kind == "gl":
        return h * h - max(0, h - n) * max(0, h - m)
    if kind == "scaling":
        return min(h, max(n, m))
    if h <= max(n, m):
        return math.comb(h, 2)
    return math.comb(h, 2) - math.comb(h - max(n, m), 2)
