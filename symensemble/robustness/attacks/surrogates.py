"""Differentiable views of a target that gradient attacks climb.

A symmetry ensemble is counted with its majority vote, which has no useful gradient, so
adaptive attacks differentiate a surrogate instead:

* :class:`AggregateView` — the ensemble's own differentiable aggregate (``mean``: log of the
  mean member softmax, or ``logit_mean``); a plain model is its own view.
* :class:`SoftVote` — a non-saturating surrogate of the vote (mean of scale-free member
  softmaxes).

Accuracy is still counted with the target's own output (the vote).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["AggregateView", "SoftVote"]


class AggregateView(nn.Module):
    """A target seen through one differentiable aggregate (``mean`` or ``logit_mean``).

    A plain model (the base) is returned as is by :meth:`of`; a symmetry ensemble is called
    with ``aggregate=...`` so that the shared module is never mutated.

    Shape:
        images (B, 3, H, W) in [0, 1] → (B, C).
    """

    def __init__(self, ensemble: nn.Module, aggregate: str = "mean") -> None:
        super().__init__()
        self.ensemble = ensemble
        self.aggregate = aggregate

    @staticmethod
    def of(module: nn.Module, aggregate: str) -> nn.Module:
        """The view of ``module``; the module itself when it has no aggregates."""
        return AggregateView(module, aggregate) if hasattr(module, "aggregate") else module

    def forward(self, x: Tensor) -> Tensor:
        return self.ensemble(x, aggregate=self.aggregate)


class SoftVote(nn.Module):
    """Non-saturating surrogate of the majority vote: log of the mean scale-free softmax.

    ``log(1/G Σ_k softmax(L_k / s_k))`` where ``s_k`` is the (detached) standard deviation of
    member k's logits over classes, per image. Dividing by ``s_k`` gives every member logits
    of unit spread, so no member with logits of 1e10 dominates the gradient and no softmax
    saturates; the argmax of each member, hence the vote it casts, is unchanged. For a model
    without members (``member_logits``) it is the same map on the model's own logits.

    Shape:
        images (B, 3, H, W) in [0, 1] → (B, C) log-probabilities.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self.module, "member_logits"):
            logits = self.module.member_logits(x)  # (G, B, C)
        elif hasattr(self.module, "aggregate"):  # an ensemble without member access
            logits = self.module(x, aggregate="logit_mean").unsqueeze(0)
        else:
            logits = self.module(x).unsqueeze(0)
        logits = logits.double()
        scale = logits.std(dim=-1, keepdim=True).detach().clamp_min(1e-12)
        probs = torch.softmax(logits / scale, dim=-1).mean(dim=0)
        return probs.clamp_min(1e-300).log().to(x.dtype)
