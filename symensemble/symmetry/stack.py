"""One representation of a layer stack: the weights and biases θ = (W_i, b_i) of Linear layers.

Every part of the package that holds the parameters of a feedforward stack uses
:class:`StackParams`: the linear symmetries (:mod:`.linear`, eq. 22) act on it, the nonlinear
data-dependent action (:mod:`.nonlinear`, Theorem 4.1, Prop. D.5) returns one (batched over
data points), the conserved quantities (:mod:`.conserved`) and Q diagnostics read it, and a
:class:`~symensemble.ensembles.ensemble.SymmetryEnsemble` reads its head's weights through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["StackParams"]


def _matvec(W: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """W h over the last dims; a plain matrix uses h @ Wᵀ (one GEMM over the batch)."""
    return h @ W.T if W.ndim == 2 else (W @ h.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class StackParams:
    """Weights and biases θ = (W_i, b_i)_{i=1..L} of a stack of Linear layers (App. C.2).

    Immutable value object: the arithmetic helpers return new instances, so a
    :class:`StackParams` can be used as a point of parameter space, a tangent vector (M·θ, ∇L)
    or an ODE state.

    A two-layer stack is the head F(e) = U σ(V e + b_V) + b_U of the paper's networks:
    weights (V, U), biases (b_V, b_U), also reachable as :attr:`V`, :attr:`b_V`, :attr:`U`,
    :attr:`b_U`.

    Attributes:
        weights: W_1 … W_L, W_i of shape (n_i, n_{i−1}), or (..., n_i, n_{i−1}) for a batch of
            stacks (e.g. one per data point of the nonlinear action); batch dims broadcast.
        biases: b_1 … b_L, b_i of shape (n_i,) (or (..., n_i)) or ``None`` for a layer without
            bias; ``None`` for the whole tuple means no biases at all.

    Shape:
        :meth:`flatten` gives a vector of length :attr:`numel` in the order W_1, b_1, W_2, b_2, …
        (unbatched stacks).
    """

    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor | None, ...] | None = None

    def __post_init__(self) -> None:
        weights = tuple(self.weights)
        biases = (None,) * len(weights) if self.biases is None else tuple(self.biases)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "biases", biases)
        if not weights:
            raise ValueError("StackParams needs at least one weight matrix")
        if len(biases) != len(weights):
            raise ValueError(
                f"StackParams needs one bias entry (tensor or None) per layer: got {len(weights)} "
                f"weights and {len(biases)} biases"
            )
        for i, W in enumerate(weights):
            if W.ndim < 2:
                raise ValueError(f"weight {i + 1} must be a matrix (n_i, n_i-1), got shape {tuple(W.shape)}")
            if i > 0 and W.shape[-1] != weights[i - 1].shape[-2]:
                raise ValueError(
                    f"weight {i + 1} has {W.shape[-1]} input columns but layer {i} has "
                    f"{weights[i - 1].shape[-2]} outputs"
                )
            b = biases[i]
            if b is not None and (b.ndim < 1 or b.shape[-1] != W.shape[-2]):
                raise ValueError(f"bias {i + 1} must have shape ({W.shape[-2]},), got {tuple(b.shape)}")

    # -- structure ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """L, the number of Linear layers."""
        return len(self.weights)

    @property
    def widths(self) -> tuple[int, ...]:
        """(n_0, n_1, …, n_L)."""
        return (int(self.weights[0].shape[-1]),) + tuple(int(W.shape[-2]) for W in self.weights)

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        """(n_1, …, n_{L−1}), the widths the hidden symmetry group acts on."""
        return self.widths[1:-1]

    @property
    def has_bias(self) -> tuple[bool, ...]:
        return tuple(b is not None for b in self.biases)

    @property
    def numel(self) -> int:
        """d = Σ_i n_i (n_{i−1} + [bias]), the dimension of Param."""
        return sum(t.numel() for t in self.tensors())

    @property
    def dtype(self) -> torch.dtype:
        return self.weights[0].dtype

    @property
    def device(self) -> torch.device:
        return self.weights[0].device

    def tensors(self) -> list[torch.Tensor]:
        """All tensors in flattening order W_1, b_1, W_2, b_2, … (``None`` biases skipped)."""
        out: list[torch.Tensor] = []
        for W, b in zip(self.weights, self.biases, strict=True):
            out.append(W)
            if b is not None:
                out.append(b)
        return out

    # -- the two-layer head F(e) = U σ(V e + b_V) + b_U -------------------------------------------
    @classmethod
    def two_layer(
        cls, U: torch.Tensor, V: torch.Tensor, b_V: torch.Tensor | None = None,
        b_U: torch.Tensor | None = None,
    ) -> StackParams:
        """The head (V, b_V, U, b_U) as a two-layer stack."""
        return cls((V, U), (b_V, b_U))

    def _layer(self, index: int, what: str) -> int:
        if self.num_layers != 2:
            raise ValueError(
                f"{what} names a layer of a two-layer head; this stack has {self.num_layers} layers"
            )
        return index

    @property
    def V(self) -> torch.Tensor:
        """Lower weight of a two-layer head, (h, n)."""
        return self.weights[self._layer(0, "V")]

    @property
    def b_V(self) -> torch.Tensor | None:
        return self.biases[self._layer(0, "b_V")]

    @property
    def U(self) -> torch.Tensor:
        """Upper weight of a two-layer head, (m, h)."""
        return self.weights[self._layer(1, "U")]

    @property
    def b_U(self) -> torch.Tensor | None:
        return self.biases[self._layer(1, "b_U")]

    # -- the network function -----------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, activations: Sequence[Callable[[torch.Tensor], torch.Tensor]]
    ) -> torch.Tensor:
        """F_θ(x) = σ_L(W_L σ_{L−1}(⋯ σ_1(W_1 x + b_1) ⋯) + b_L) (App. C.2 / D.3).

        Args:
            x: inputs (..., n_0).
            activations: σ_1 … σ_{L−1}, optionally followed by σ_L (identity when omitted),
                each acting on the last dimension.

        Shape:
            x (..., n_0) → (..., n_L) (batch dims of x and of batched weights broadcast).
        """
        acts = self.check_activations(activations)
        h = x
        for i, (W, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = _matvec(W, h)
            if b is not None:
                h = h + b
            if i < len(acts):
                h = acts[i](h)
        return h

    def check_activations(
        self, activations: Sequence[Callable[[torch.Tensor], torch.Tensor]]
    ) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """``activations`` as a list after checking there are L − 1 or L of them."""
        L, acts = self.num_layers, list(activations)
        if len(acts) not in (L - 1, L):
            raise ValueError(
                f"{L} layers need {L - 1} hidden activations (optionally plus an output one), "
                f"got {len(acts)}"
            )
        return acts

    # -- modules --------------------------------------------------------------------------------
    @classmethod
    def from_linears(
        cls, linears: Sequence[nn.Linear], dtype: torch.dtype | None = torch.float64,
        device: torch.device | str | None = None,
    ) -> StackParams:
        """θ of ``nn.Linear`` layers as detached copies (float64 by default)."""
        return cls(
            tuple(lin.weight.detach().to(device=device, dtype=dtype) for lin in linears),
            tuple(None if lin.bias is None else lin.bias.detach().to(device=device, dtype=dtype)
                  for lin in linears),
        )

    @torch.no_grad()
    def copy_to(self, linears: Sequence[nn.Linear]) -> None:
        """Copy θ into ``nn.Linear`` layers of the same structure (cast to their dtypes)."""
        current = StackParams.from_linears(linears, dtype=None)
        if current.widths != self.widths or current.has_bias != self.has_bias:
            raise ValueError(
                f"parameters with widths {self.widths} do not fit layers with widths {current.widths}"
            )
        for lin, W, b in zip(linears, self.weights, self.biases, strict=True):
            lin.weight.copy_(W.to(lin.weight.dtype))
            if b is not None:
                lin.bias.copy_(b.to(lin.bias.dtype))

    # -- flattening --------------------------------------------------------------------------
    def flatten(self) -> torch.Tensor:
        """θ as one vector of length d (Param ≃ R^d, §3.4)."""
        return torch.cat([t.reshape(-1) for t in self.tensors()])

    def unflatten(self, vector: torch.Tensor) -> StackParams:
        """A StackParams with this structure filled from ``vector`` (length :attr:`numel`)."""
        if vector.ndim != 1 or vector.numel() != self.numel:
            raise ValueError(f"expected a vector of length {self.numel}, got shape {tuple(vector.shape)}")
        chunks = iter(torch.split(vector, [t.numel() for t in self.tensors()]))
        weights, biases = [], []
        for W, b in zip(self.weights, self.biases, strict=True):
            weights.append(next(chunks).view(W.shape))
            biases.append(None if b is None else next(chunks).view(b.shape))
        return StackParams(tuple(weights), tuple(biases))

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> StackParams:
        """A StackParams with this structure built from tensors in :meth:`tensors` order.

        Useful to wrap ``torch.autograd.grad(loss, params.tensors())`` as a gradient ∇L.
        """
        tensors = list(tensors)
        if len(tensors) != len(self.tensors()):
            raise ValueError(f"expected {len(self.tensors())} tensors, got {len(tensors)}")
        it = iter(tensors)
        weights, biases = [], []
        for b in self.biases:
            weights.append(next(it))
            biases.append(None if b is None else next(it))
        return StackParams(tuple(weights), tuple(biases))

    # -- arithmetic (tangent vectors, ODE states) ---------------------------------------------
    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> StackParams:
        """Apply ``fn`` to every tensor."""
        return StackParams(
            tuple(fn(W) for W in self.weights),
            tuple(None if b is None else fn(b) for b in self.biases),
        )

    def zip_map(
        self, other: StackParams, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> StackParams:
        """Apply ``fn`` to matching tensors of two StackParams with the same structure."""
        if self.widths != other.widths or self.has_bias != other.has_bias:
            raise ValueError(f"structure mismatch: widths {self.widths} vs {other.widths}")
        return StackParams(
            tuple(fn(a, b) for a, b in zip(self.weights, other.weights, strict=True)),
            tuple(
                None if a is None else fn(a, b)  # type: ignore[arg-type]
                for a, b in zip(self.biases, other.biases, strict=True)
            ),
        )

    def __add__(self, other: StackParams) -> StackParams:
        return self.zip_map(other, torch.add)

    def __sub__(self, other: StackParams) -> StackParams:
        return self.zip_map(other, torch.sub)

    def __mul__(self, scalar: float | torch.Tensor) -> StackParams:
        return self.map(lambda t: t * scalar)

    __rmul__ = __mul__

    def inner(self, other: StackParams) -> torch.Tensor:
        """⟨θ, θ'⟩, contracting all indices (§3.4)."""
        if self.widths != other.widths or self.has_bias != other.has_bias:
            raise ValueError(f"structure mismatch: widths {self.widths} vs {other.widths}")
        return sum(
            ((a * b).sum() for a, b in zip(self.tensors(), other.tensors(), strict=True)),
            torch.zeros((), dtype=self.dtype, device=self.device),
        )

    def norm(self) -> torch.Tensor:
        return self.inner(self).sqrt()

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> StackParams:
        return self.map(lambda t: t.to(device=device, dtype=dtype))

    def detach(self) -> StackParams:
        return self.map(lambda t: t.detach())

    def clone(self) -> StackParams:
        return self.map(lambda t: t.clone())

    def requires_grad_(self) -> StackParams:
        """A detached copy whose tensors require grad (for autograd through a loss)."""
        return self.map(lambda t: t.detach().clone().requires_grad_(True))

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def random(
        cls,
        widths: Sequence[int],
        *,
        bias: bool | Sequence[bool] = True,
        std: float | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> StackParams:
        """Gaussian parameters for widths (n_0, …, n_L).

        Args:
            widths: (n_0, …, n_L), at least two entries.
            bias: whether each layer has a bias (one bool for all layers, or one per layer).
            std: entry standard deviation; ``None`` uses 1/√n_{i−1} per layer (LeCun).
            generator: torch RNG for reproducibility.
            dtype: float64 by default (the identities are checked in float64).
        """
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"widths must be >= 2 positive integers (n_0, ..., n_L), got {widths}")
        L = len(widths) - 1
        flags = [bool(bias)] * L if isinstance(bias, bool) else [bool(b) for b in bias]
        if len(flags) != L:
            raise ValueError(f"bias must be a bool or {L} bools, got {bias}")
        weights, biases = [], []
        for i in range(L):
            s = std if std is not None else 1.0 / math.sqrt(widths[i])
            weights.append(torch.randn(widths[i + 1], widths[i], generator=generator, dtype=dtype) * s)
            biases.append(
                torch.randn(widths[i + 1], generator=generator, dtype=dtype) * s if flags[i] else None
            )
        return cls(tuple(weights), tuple(biases))
