"""Auto-PGD (Croce & Hein 2020): PGD whose step size adapts itself, on CE or DLR.

* ``apgd`` — the grid's APGD-CE (torchattacks), ``eot_iter`` samples on stochastic models.
* ``apgd-ce``, ``apgd-dlr`` — the portfolio's adaptive APGD on the target's differentiable
  aggregate (:class:`~.surrogates.AggregateView`), ``restarts`` random starts.
* ``apgd-softvote`` — APGD-CE on the soft-vote surrogate (:class:`~.surrogates.SoftVote`).

The portfolio's APGD keeps the highest-loss point for images its surrogate could not fool —
that point can still flip the vote — where torchattacks would return the clean image.
"""

from __future__ import annotations

import torch
import torchattacks
from torch import Tensor

from .registry import Attack, GridAttack, Option, register_attack
from .surrogates import AggregateView, SoftVote

__all__ = ["APGD", "APGDCE", "APGDDLR", "APGDSoftVote"]


@register_attack
class APGD(GridAttack):
    """The grid's APGD on cross-entropy: step size adapted, no alpha to tune."""

    name = "apgd"

    @classmethod
    def resolve_alpha(cls, eps, steps, alpha):
        return None  # APGD chooses its own step size

    def build(self, model, *, eps, seed=0, stochastic=False):
        return torchattacks.APGD(model, norm="Linf", eps=eps, steps=self.resolve_steps(self.steps),
                                 n_restarts=1, seed=seed, loss="ce",
                                 eot_iter=self.eot_iter if stochastic else 1)


class _BestAPGD(torchattacks.APGD):
    """torchattacks' APGD, one run, returning the best adversarial or highest-loss point."""

    def run(self, x: Tensor, y: Tensor) -> Tensor:
        x_best, acc, _, x_best_adv = self.attack_single_run(x.clone(), y.clone())
        fooled = (acc == 0).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(fooled, x_best_adv, x_best).detach()


@register_attack
class APGDCE(Attack):
    """Portfolio APGD on the cross-entropy of the target's differentiable aggregate."""

    name = "apgd-ce"
    kind = "portfolio"
    loss = "ce"
    surrogate = "aggregate"
    steps = Option(100, "Portfolio: iterations of each adaptive APGD.", field="apgd_steps",
                   minimum=1)
    restarts = Option(1, "Portfolio: random restarts of each adaptive APGD.", field="restarts",
                      minimum=1)
    attack_aggregate = Option("mean", "differentiable aggregate of an ensemble target",
                              field="attack_aggregate", external=True)

    def view(self, model):
        """The module whose loss is climbed."""
        if self.surrogate == "softvote":
            return SoftVote(model)
        return AggregateView.of(model, self.attack_aggregate)

    def craft(self, model, x, y, *, eps, seed, stochastic, generator):
        view, out = self.view(model), []
        for r in range(self.restarts):
            torch.manual_seed((seed + r) % (2**63))
            attack = _BestAPGD(view, norm="Linf", eps=eps, steps=self.steps, n_restarts=1,
                               seed=(seed + r) % (2**31), loss=self.loss,
                               eot_iter=self.eot_iter if stochastic else 1)
            out.append(attack.run(x, y))
        return out


@register_attack
class APGDDLR(APGDCE):
    """Portfolio APGD on the Difference-of-Logits-Ratio loss: invariant to the logits' shift
    and scale, so saturation cannot hide the gradient."""

    name = "apgd-dlr"
    loss = "dlr"


@register_attack
class APGDSoftVote(APGDCE):
    """Portfolio APGD-CE on the soft-vote surrogate of the majority vote."""

    name = "apgd-softvote"
    surrogate = "softvote"
