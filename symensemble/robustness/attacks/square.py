"""Square (Andriushchenko et al. 2020): gradient-free random search, AutoAttack's check.

Run on the target's differentiable aggregate (margin loss) with ``square_queries`` model
queries; it uses no gradient, so it exposes gradient masking when it beats the gradient
attacks. A zero budget leaves it out of the portfolio.
"""

from __future__ import annotations

import torch
import torchattacks

from .registry import Attack, Option, register_attack
from .surrogates import AggregateView

__all__ = ["Square"]


@register_attack
class Square(Attack):
    """Square attack, L∞, one run of ``queries`` queries."""

    name = "square"
    kind = "portfolio"
    queries = Option(0, "Portfolio: Square attack query budget (0 = no Square).",
                     field="square_queries", minimum=0)
    attack_aggregate = Option("mean", "differentiable aggregate of an ensemble target",
                              field="attack_aggregate", external=True)

    @property
    def enabled(self) -> bool:
        return self.queries > 0

    def craft(self, model, x, y, *, eps, seed, stochastic, generator, judge):
        torch.manual_seed(seed % (2**63))
        view = AggregateView.of(model, self.attack_aggregate)
        attack = torchattacks.Square(view, norm="Linf", eps=eps, n_queries=self.queries,
                                     n_restarts=1, seed=seed % (2**31), loss="margin")
        return [attack(x, y).detach()]
