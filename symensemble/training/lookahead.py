"""Lookahead on the weights (Zhang et al. 2019, "Lookahead Optimizer: k steps forward, 1 step back").

Beside the trained ("fast") weights θ a slow copy φ is kept. Every ``every`` optimizer steps

    φ ← φ + α (θ − φ),    θ ← φ,

i.e. the fast weights explore for k steps and are then pulled back to a point on the line
between where they started and where they went. airbench (Jordan 2024, after hlb-cifar10)
uses the same scheme with α shrinking over the run: early on the slow copy simply follows
the fast weights (α = 1), and the averaging sets in towards the end, where it acts like an
EMA of the weights. Here α(t) = 1 − (1 − α_end)·(t/T)³ at optimizer step t of T.

:class:`symensemble.training.loop` also syncs at the end of every epoch, so at every checkpoint
θ = φ and a resumed run needs no extra state to continue exactly.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Lookahead", "lookahead_alpha"]


def lookahead_alpha(step: int, total_steps: int, alpha_end: float) -> float:
    """α after ``step`` optimizer steps of ``total_steps``: from 1 down to ``alpha_end``, cubic in t/T."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - alpha_end) * progress**3


class Lookahead:
    """The slow copy φ of a model's trainable parameters.

    Args:
        model: the trained model; its parameters that require grad are the fast weights θ.
        alpha_end: α at the end of training (in (0, 1]; 1 disables the averaging).
    """

    def __init__(self, model: nn.Module, alpha_end: float) -> None:
        if not 0 < alpha_end <= 1:
            raise ValueError(f"lookahead alpha must be in (0, 1], got {alpha_end!r}")
        self.alpha_end = alpha_end
        self.fast = [p for p in model.parameters() if p.requires_grad]
        self.slow = [p.detach().clone() for p in self.fast]

    @torch.no_grad()
    def sync(self, step: int, total_steps: int) -> float:
        """φ ← φ + α(θ − φ); θ ← φ, with α of step ``step``; returns that α."""
        alpha = lookahead_alpha(step, total_steps, self.alpha_end)
        for slow, fast in zip(self.slow, self.fast):
            slow.lerp_(fast, alpha)
            fast.copy_(slow)
        return alpha
