"""Module bridging: the weight stack θ of a SymModel, SymHead or MLP, read and written back.

The linear symmetries act on :class:`~.stack.StackParams`; this module finds the Linear layers
and hidden activations of a network through the one head finder
(:func:`~.heads.find_head`) and converts torch activations into registry ones, so that
:class:`~.linear.LinearSymmetry` knows which group acts (eq. 4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .activations import Activation, create_activation
from .heads import find_head
from .stack import StackParams

__all__ = ["module_layers", "stack_params", "load_stack_params"]

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

    Found by :func:`~.heads.find_head` (the one head finder): a model with a SymHead ``head``;
    a SymHead (V → σ → U); an ``nn.Sequential`` alternating Linear and activation modules,
    starting and ending with Linear. Torch activations become registry ones, so that the
    group of eq. 4 is known.

    Raises:
        ValueError: anything else, naming what was found and what is expected.
    """
    parts = find_head(module)
    linears, acts = parts.layers()
    mlp = isinstance(module, nn.Sequential)
    where = [f"MLP module {2 * i + 1}" if mlp else "head activation" for i in range(len(acts))]
    return list(linears), [_as_activation(a, w) for a, w in zip(acts, where, strict=True)]


def stack_params(module: nn.Module, dtype: torch.dtype | None = torch.float64) -> StackParams:
    """θ of a SymModel/SymHead/MLP as a detached :class:`StackParams` (float64 by default)."""
    return StackParams.from_linears(module_layers(module)[0], dtype=dtype)


def load_stack_params(module: nn.Module, params: StackParams) -> None:
    """Copy θ into the Linear layers of ``module`` (in place, cast to each parameter's dtype)."""
    params.copy_to(module_layers(module)[0])

