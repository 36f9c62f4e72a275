"""The one head abstraction: where the two layers the symmetries act on live in a model.

Every consumer — the symmetry ensembles, the linear symmetries acting on a module, the
diagnostics — asks :func:`find_head` for a :class:`HeadParts` and never looks for ``.head``
attributes itself. A head is

    H = V(embed(x))          pre-activations, (B, h) dense or (B, h, *positions) spatial
    logits = U(pool(σ(H)))   pool: ``none`` (dense) or ``avg`` (global average over positions)

The paper's head (§3.3, App. C) is the dense case F(e) = U σ(V e + b_V) + b_U; a spatial head
(conv features Z → σ → global average pooling → Linear) is the same head with the h channels
as the hidden layer, so the group acts on H's channel dimension at every position and the
pooling commutes with nothing but is applied after σ. ``V`` may be ``None`` when the backbone
produces H itself (then ``embed`` gives H).

This module imports nothing from ``symensemble.models`` or ``symensemble.ensembles``: it is
duck-typed (``embed`` + ``head.V/act/U``), so the layers above it can all use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .stack import StackParams

__all__ = ["HeadParts", "POOLS", "find_head"]

#: How positions are reduced after σ: ``none`` (a dense head, H is (B, h)), ``avg`` (global
#: average pooling over every position of H (B, h, *positions)) or ``block`` (a Linear → σ →
#: Linear pair inside a network: H is (B, T, h), U's output (B, T, d) re-enters the network,
#: so :meth:`HeadParts.from_hidden` gives U's output, not logits).
POOLS = ("none", "avg", "block")

_HEAD_NAMES = ("V", "act", "U")


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass
class HeadParts:
    """Where a model's head lives: H = V(embed(x)), logits = U(pool(act(H))).

    The live modules are kept (they move, train and save with the model, and the forward
    stays the model's own); their weights are read as the package's one layer-stack
    representation, :meth:`params`.

    Attributes:
        embed: images (B, ...) → the input of V; with ``V=None``, → H itself. ``None`` when
            the model does not say (then only the weights can be used, not :meth:`hidden`).
        V: the lower layer (``nn.Linear`` d → h), or ``None`` when ``embed`` gives H.
        act: the hidden activation σ (on the last dimension when dense; elementwise when
            spatial).
        U: ``nn.Linear`` h → C, the upper layer.
        pool: one of :data:`POOLS`.
        lower: for an MLP, the (Linear, activation, ...) modules below V, lowest first — the
            rest of the layer stack (:meth:`layers`).
    """

    embed: Callable[[Tensor], Tensor] | None
    V: nn.Module | None
    act: Callable[[Tensor], Tensor]
    U: nn.Linear
    pool: str = "none"
    lower: tuple[nn.Module, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; expected one of {list(POOLS)}")

    @property
    def hidden_features(self) -> int:
        """h, the width the group acts on (U's input width)."""
        return int(self.U.in_features)

    @property
    def num_classes(self) -> int:
        return int(self.U.out_features)

    @property
    def spatial(self) -> bool:
        """True when H has positions that are pooled after σ (channels first)."""
        return self.pool == "avg"

    def hidden(self, x: Tensor) -> Tensor:
        """H = V(embed(x)): (B, h), or (B, h, *positions) for a spatial head."""
        if self.embed is None:
            raise ValueError("this head has no embed (features entering V); pass embed=...")
        features = self.embed(x)
        return features if self.V is None else self.V(features)

    def pooled(self, S: Tensor) -> Tensor:
        """Reduce σ(H) (B, h, *positions) to (B, h) by the head's pooling (dense: unchanged)."""
        return S.flatten(2).mean(-1) if self.pool == "avg" else S

    def from_hidden(self, H: Tensor) -> Tensor:
        """logits = U(pool(σ(H)))."""
        return self.U(self.pooled(self.act(H)))

    def __call__(self, x: Tensor) -> Tensor:
        return self.from_hidden(self.hidden(x))

    def layers(self) -> tuple[list[nn.Linear], list[Callable[[Tensor], Tensor]]]:
        """The whole layer stack: its Linear layers (lowest first) and hidden activations.

        Raises:
            ValueError: V is not an ``nn.Linear`` (a spatial head has no weight stack).
        """
        if not isinstance(self.V, nn.Linear):
            raise ValueError(
                f"the head's V is {type(self.V).__name__ if self.V is not None else 'None'}, not an "
                "nn.Linear: only a Linear → σ → Linear stack has weights the linear symmetries act on"
            )
        linears = [m for m in self.lower[0::2]] + [self.V, self.U]
        acts = [m for m in self.lower[1::2]] + [self.act]
        return linears, acts  # type: ignore[return-value]

    def params(self, dtype: torch.dtype | None = torch.float64, device: torch.device | str | None = None
               ) -> StackParams:
        """Detached copies of (V, b_V, U, b_U) as a two-layer stack (float64 by default)."""
        if not isinstance(self.V, nn.Linear):
            raise ValueError("params() needs a head whose V is an nn.Linear")
        return StackParams.from_linears((self.V, self.U), dtype=dtype, device=device)


def _has_head_names(obj: object) -> bool:
    return all(hasattr(obj, name) for name in _HEAD_NAMES)


def _mlp_parts(module: nn.Sequential) -> HeadParts:
    layers = list(module)
    if len(layers) < 3 or len(layers) % 2 == 0:
        raise ValueError(
            "an MLP must be nn.Sequential(Linear, act, Linear, ..., Linear) with an odd "
            f"number >= 3 of modules, got {len(layers)}"
        )
    for j in range(0, len(layers), 2):
        if not isinstance(layers[j], nn.Linear):
            raise ValueError(f"MLP module {j} must be nn.Linear, got {type(layers[j]).__name__}")
    lower = tuple(layers[:-3])
    embed = nn.Sequential(*lower) if lower else _identity
    return HeadParts(embed, layers[-3], layers[-2], layers[-1], lower=lower)


def find_head(module: nn.Module) -> HeadParts:
    """The :class:`HeadParts` of a model, a head or an MLP (duck-typed).

    Accepted, in this order:

    * a head itself — a module with ``V``, ``act`` and ``U`` (a SymHead): embed is the identity;
    * a model with ``head`` having ``V``, ``act``, ``U`` (a SymModel): embed is ``model.embed``
      when it has one (``None`` otherwise);
    * ``nn.Sequential(Linear, act, Linear, ..., Linear)``: V, act, U are its last three
      modules, the rest is ``embed`` and :attr:`HeadParts.lower`.

    Raises:
        ValueError: anything else, naming what was found and what is expected.
    """
    if isinstance(module, nn.Module) and not isinstance(module, nn.Sequential) and _has_head_names(module):
        return HeadParts(_identity, module.V, module.act, module.U)
    head = getattr(module, "head", None)
    if isinstance(head, nn.Module) and not isinstance(module, nn.Sequential):
        if not _has_head_names(head):
            raise ValueError(
                f"{type(module).__name__}.head is a {type(head).__name__}, not a SymHead (no V, act, U); "
                "the symmetries act on a Linear → sigma → Linear head; for another network use "
                "SymmetryEnsemble.from_modules(model, images, embed=..., V=..., act=..., U=...)"
            )
        embed = getattr(module, "embed", None)
        return HeadParts(embed if callable(embed) else None, head.V, head.act, head.U)
    if isinstance(module, nn.Sequential):
        return _mlp_parts(module)
    raise ValueError(
        f"cannot find a stack of Linear layers in {type(module).__name__}: expected a SymModel "
        "(with a SymHead .head, and embed(x)), a SymHead, or nn.Sequential(Linear, act, ..., Linear)"
    )
