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

The package splits the subject in four: :mod:`.groups` (one hidden layer's group and π),
this module (the product group acting on a stack, eqs. 22–23, and on a module),
:mod:`.module_bridge` (reading θ out of a SymModel/SymHead/MLP and writing it back) and
:mod:`.orbits` (orbit dimensions, Theorem 3.3).

Example::

    head = model.head                                 # SymHead: V → σ → U
    sym = LinearSymmetry.for_module(head)             # T₊(16) for LeakyReLU
    g = sym.sample(generator=torch.Generator().manual_seed(0))
    new_head = transform_module(head, g, sym)         # a transformed copy, same function
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import orbits
from .activations import Activation, create_activation
from .groups import ALLOWED_SUBGROUPS, GroupElement, HiddenGroup, group_kind_for_activation
from .module_bridge import load_stack_params, module_layers, stack_params
from .stack import StackParams

__all__ = ["LinearSymmetry", "stack_forward", "transform_module"]


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
# The product group acting on a whole stack
# ----------------------------------------------------------------------------------------------



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
                if want not in ALLOWED_SUBGROUPS[kind]:
                    raise ValueError(
                        f"hidden layer {i + 1}: group {want!r} is not a symmetry of activation "
                        f"{act.name!r} (allowed: {list(ALLOWED_SUBGROUPS[kind])})"
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
        """The orbit's tangent vectors, one row per Lie-algebra basis element
        (:func:`.orbits.tangent_vectors`).

        Shape:
            (dim G, d).
        """
        return orbits.tangent_vectors(self, params, max_entries)

    def orbit_dimension(self, params: StackParams, rtol: float | None = None, method: str = "auto") -> int:
        """dim G·θ, by SVD of the tangent vectors or the Gram spectrum
        (:func:`.orbits.orbit_dimension`, Theorem 3.3)."""
        return orbits.orbit_dimension(self, params, rtol, method)

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

