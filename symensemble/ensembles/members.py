"""Evaluating G member heads at once, in chunks of members so memory stays bounded.

Member k of an ensemble computes W_k σ(g_k H) + b_U (eq. 85) from the shared pre-activations
H (B, h). One GEMM computes every g_k H of a chunk, one batched product applies the W_k; under
autograd each chunk is checkpointed (recomputed in backward), so the graph keeps only what
``reduce`` returns per chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ..symmetry.activations import Activation

__all__ = ["is_pointwise", "as_buffer", "member_bytes", "positions_as_rows", "chunk_slices", "member_chunk",
           "run_members"]

_ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)  # fmt: skip

ActFn = Callable[[Tensor], Tensor]


def is_pointwise(act: ActFn) -> bool:
    """Whether σ acts entry by entry (then any tensor layout will do)."""
    if isinstance(act, Activation):
        return bool(act.pointwise)
    if isinstance(act, nn.PReLU):
        return act.num_parameters == 1
    functions = (torch.tanh, torch.sigmoid, torch.relu, nn.functional.relu, nn.functional.gelu,
                 nn.functional.silu)
    return isinstance(act, _ELEMENTWISE) or act in functions


def as_buffer(t: Tensor, device: torch.device) -> Tensor:
    """A float64 copy on ``device`` that is a normal tensor even when made under inference_mode
    (so an ensemble built inside ``torch.inference_mode()`` can later be attacked)."""
    with torch.inference_mode(False):
        return t.to(device, torch.float64, copy=True).contiguous()


def member_bytes(batch: int, hidden: int, classes: int, dtype: torch.dtype, positions: int = 1) -> int:
    """Scratch bytes of one member's forward on ``batch`` inputs: (2h·P + 2C)·B numbers
    (P positions of a spatial head, 1 for a dense one)."""
    return batch * (2 * hidden * positions + 2 * classes) * torch.finfo(dtype).bits // 8


def positions_as_rows(H: Tensor) -> tuple[Tensor, int]:
    """(B, h, *positions) → ((B·P, h) rows, P), image-major; a dense (B, h) stays, P = 1."""
    if H.ndim == 2:
        return H, 1
    B, h = H.shape[:2]
    rows = H.reshape(B, h, -1).transpose(1, 2)
    return rows.reshape(-1, h), rows.shape[1]


def chunk_slices(num_members: int, per_member: int, chunk_size: int | None, max_bytes: int
                 ) -> list[slice]:
    """Member slices of ``chunk_size`` members, or as many as fit ``max_bytes`` of scratch."""
    size = chunk_size if chunk_size is not None else max(1, max_bytes // max(1, per_member))
    return [slice(start, min(num_members, start + size)) for start in range(0, num_members, size)]


def member_chunk(act: ActFn, pointwise: bool, H: Tensor, g: Tensor, W: Tensor, b: Tensor,
                 positions: int = 1) -> Tensor:
    """Logits of a chunk of c members, layout (c, C, B): W_k pool(σ(g_k H)) + b_U.

    One GEMM computes every g_k H at once, [g_1; …; g_c] (c·h × h) @ Hᵀ → (c, h, B·P), and one
    batched product applies the W_k. A σ that is not known to act elementwise gets its
    input as (B·P, c, h), so that it acts on each h-vector (e.g. a radial activation).
    With P > 1 (a spatial head; H holds B·P rows, image-major) σ(g_k H) is averaged over
    each image's P positions before W_k (global average pooling).
    """
    c, h = g.shape[0], g.shape[-1]
    if pointwise:
        S = act(torch.mm(g.reshape(c * h, h), H.transpose(0, 1))).view(c, h, -1)
    else:
        Z = torch.mm(H, g.reshape(c * h, h).transpose(0, 1)).view(H.shape[0], c, h)
        S = act(Z).permute(1, 2, 0)
    if positions > 1:
        S = S.reshape(c, h, -1, positions).mean(-1)
    return torch.baddbmm(b.view(1, -1, 1), W, S)


def run_members(
    act: ActFn,
    pointwise: bool,
    H: Tensor,
    members: tuple[Tensor, Tensor, Tensor],
    chunks: list[slice],
    reduce: Callable[[Tensor], Tensor],
    positions: int = 1,
) -> list[Tensor]:
    """Apply ``reduce`` to each chunk's (c, C, B) logits; checkpointed under autograd.

    Args:
        H: (B·P, h) pre-activations (:func:`positions_as_rows`), in the evaluation dtype.
        members: (g (G, h, h), W (G, C, h), b (C,)) in the evaluation dtype.
    """
    g, W, b = members
    checkpoint = torch.is_grad_enabled() and H.requires_grad and len(chunks) > 1

    def step(Hc: Tensor, gc: Tensor, Wc: Tensor) -> Tensor:
        return reduce(member_chunk(act, pointwise, Hc, gc, Wc, b, positions))

    out = []
    for sl in chunks:
        if checkpoint:
            out.append(torch.utils.checkpoint.checkpoint(step, H, g[sl], W[sl], use_reentrant=False))
        else:
            out.append(step(H, g[sl], W[sl]))
    return out
