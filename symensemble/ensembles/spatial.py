"""Spatial heads: Z (B, C, H, W) → σ → global average pooling → Linear, as symmetry ensembles.

Almost every pretrained classifier (torchvision and timm ResNets, RobustBench's WideResNets)
ends this way. The paper's group action carries over with the C channels as the hidden
layer (App. I, eqs. 84–85 with pooled features): member k computes σ(g_k Z) at every
position, pools, and applies

    U_k = U · A_k · B_k⁺,   A_k = pool(σ(Z)),  B_k = pool(σ(g_k Z))   (both C × s)

over its own s calibration images — the least-squares solution of U_k B_k = U A_k, so with
s ≤ C the member reproduces the model's logits on those images. The backbone runs once per
calibration chunk: Z of a WideResNet (s·C·H·W numbers per member) is never held for all
members, only the pooled (C × s) features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..runtime import eval_mode
from ..symmetry.heads import HeadParts
from ..symmetry.pi_solver import condition_number, right_pinv_solve
from .calibration import image_batches, model_device
from .members import positions_as_rows
from .transforms import MemberDraw, MemberTransform, random_gl

__all__ = ["pooled_features", "spatial_group_draw"]


def pooled_features(act: Callable[[Tensor], Tensor], Z: Tensor, g: Tensor | None = None) -> Tensor:
    """pool(σ(g Z)) per image, as columns: Z (n, h, *positions), g (h, h) or None → (h, n)."""
    rows, P = positions_as_rows(Z)
    if g is not None:
        rows = rows @ g.transpose(0, 1)
    S = act(rows).view(Z.shape[0], P, -1).mean(1)
    return S.transpose(0, 1)


@torch.inference_mode()
def _member_features(model: nn.Module, parts: HeadParts, images: Tensor, g: Tensor, dtype: torch.dtype,
                     batch_size: int) -> tuple[Tensor, Tensor]:
    """(pool(σ(Z)), pool(σ(g Z))) of one member's images, streamed in batches: (h, s) each."""
    device = model_device(model)
    A, B = [], []
    with eval_mode(model):
        for _, x in image_batches(images, batch_size):
            Z = parts.hidden(x.to(device)).to(dtype)
            A.append(pooled_features(parts.act, Z))
            B.append(pooled_features(parts.act, Z, g.to(Z.device, dtype)))
    return torch.cat(A, 1), torch.cat(B, 1)


def spatial_group_draw(model: nn.Module, parts: HeadParts, images: Tensor, transform: MemberTransform,
                       num_members: int, samples: int, generator: torch.Generator,
                       dtype: torch.dtype = torch.float32, batch_size: int = 256) -> MemberDraw:
    """Members (g_k, U_k = U A_k B_k⁺) of a spatial head, member by member (float64 results).

    g_k = exp(eps·T_k) as for dense heads (same generator stream); A_k and B_k are computed
    in ``dtype`` (float32 suffices for pooled spatial features, where pooling keeps B_k far
    better conditioned than a dense σ(g H_k)) and solved in float64.

    Raises:
        ValueError: a transform other than ``group``/``identity``-like baselines that needs
            calibration, or a non-finite solve.
    """
    if transform.name != "group":
        raise ValueError(f"spatial heads support the calibrated transform 'group', not {transform.name!r}")
    h = parts.hidden_features
    U = parts.U.weight.detach().to("cpu", torch.float64)
    g = random_gl(num_members, h, transform.eps, generator)
    W = torch.empty(num_members, U.shape[0], h, dtype=torch.float64)
    cond = torch.empty(num_members, dtype=torch.float64)
    for k in range(num_members):
        A, B = _member_features(model, parts, images[k * samples : (k + 1) * samples], g[k], dtype,
                                batch_size)
        A, B = A.cpu().double(), B.cpu().double()
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"member {k}: pooled σ(g_k Z) is not finite in {dtype} (eps={transform.eps:g} "
                             "too large for this head); use a smaller eps")
        cond[k] = condition_number(B)
        ridge = getattr(transform, "ridge", None)
        if ridge is None and not cond[k] <= transform.condition_limit:
            raise ValueError(
                f"member {k}: pooled σ(g_k Z) over its {samples} calibration images is rank-deficient "
                f"(condition number {float(cond[k]):.3g}): some channels are inactive on every image "
                "(an untrained network, or images unlike its training data); pass real training "
                "images, a larger samples_per_member, or ridge=1e-12 for a regularized solve"
            )
        W[k] = right_pinv_solve(U @ A, B, ridge=ridge)
    if not bool(torch.isfinite(W).all()):
        raise ValueError("the spatial members' U_k are not finite; use a smaller eps")
    return MemberDraw(g, W, cond)
