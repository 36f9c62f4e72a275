"""Block mode: the group action on a Linear → σ → Linear pair inside a network (e.g. a ViT MLP).

The pair V (``mlp.fc1``) → σ → U (``mlp.fc2``) acts on tokens: H = V(t) has one row per
position (B, T, h). Member k replaces U's output by W_k σ(g_k H) + b_U with W_k = U π(g_k, H_k),
π solved by least squares over all positions of the member's calibration images (App. I,
eq. 84 with positions as samples), and the rest of the network runs on it.

Caveat: the layers after U are nonlinear, so a member agrees with the model exactly only at
U's output, on its own calibration positions (when their number s·T ≤ h); the logits then agree
on those images too, elsewhere they differ as much as U's output does. Each member costs one
forward of everything from U on (here: a full forward per member), not a batched head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..symmetry.heads import HeadParts

__all__ = ["block_parts", "hooked_output", "run_block_members"]


class _Output(nn.Module):
    """x → the output of submodule ``module`` of ``model`` (a forward hook; must fire once)."""

    def __init__(self, model: nn.Module, module: nn.Module, name: str) -> None:
        super().__init__()
        self.model, self.module, self.name = [model], [module], name

    def forward(self, x: Tensor) -> Tensor:
        return hooked_output(self.model[0], self.module[0], x, clone=False, error=lambda n: (
            f"{self.name!r} ran {n} times in one forward; block mode needs a Linear called exactly once"))


def hooked_output(model: nn.Module, module: nn.Module, x: Tensor, *, clone: bool,
                  error: Callable[[int], str]) -> Tensor:
    """The output of submodule ``module`` during one ``model(x)``, caught by a forward hook.

    ``clone``: copy it (a later in-place op of the model must not change it). The hook must
    fire exactly once; otherwise ``ValueError(error(times_it_fired))``.
    """
    seen: list[Tensor] = []
    handle = module.register_forward_hook(lambda m, i, out: seen.append(out.clone() if clone else out))
    try:
        model(x)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise ValueError(error(len(seen)))
    return seen[0]


def block_parts(model: nn.Module, V: str, act: Any, U: str) -> HeadParts:
    """HeadParts of the pair ``V`` → σ → ``U`` (submodule names) in block mode.

    ``act="auto"``: the ``act`` submodule next to V (timm's ``Mlp.act``).
    """
    try:
        lower, upper = model.get_submodule(V), model.get_submodule(U)
    except AttributeError as err:
        raise ValueError(f"block mode: {err}; pass hidden=<V Linear> and classifier=<U Linear> names"
                         ) from None
    if not (isinstance(lower, nn.Linear) and isinstance(upper, nn.Linear)):
        raise ValueError("block mode needs nn.Linear V and U (hidden=..., classifier=...), got "
                         f"{type(lower).__name__} and {type(upper).__name__}")
    if act == "auto":
        parent = V.rpartition(".")[0]
        try:
            act = model.get_submodule(f"{parent}.act" if parent else "act")
        except AttributeError:
            raise ValueError(f"block mode: no 'act' next to {V!r}; pass act=") from None
    return HeadParts(_Output(model, lower, V), None, act, upper, pool="block")


def run_block_members(model: nn.Module, parts: HeadParts, x: Tensor, members: tuple[Tensor, Tensor, Tensor],
                      reduce: Callable[[Tensor], Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``reduce`` of each member's logits (1, C, B): one forward of the model per member, U's
    output replaced by W_k σ(g_k H) + b_U (H captured at V's output in the same forward)."""
    g, W, b = members
    lower = parts.embed.module[0]  # type: ignore[union-attr]
    captured: list[Tensor] = []

    def member_output(k: int) -> Callable[..., Tensor]:
        def hook(module: nn.Module, inputs: Any, out: Tensor) -> Tensor:
            H = captured.pop().to(dtype)
            S = parts.act(H @ g[k].transpose(0, 1))
            return (S @ W[k].transpose(0, 1) + b).to(out.dtype)
        return hook

    out = []
    for k in range(g.shape[0]):
        handles = [lower.register_forward_hook(lambda m, i, o: captured.append(o)),
                   parts.U.register_forward_hook(member_output(k))]
        try:
            logits = model(x)
        finally:
            for h in handles:
                h.remove()
        out.append(reduce(logits.to(dtype).transpose(0, 1).unsqueeze(0)))
    return out
