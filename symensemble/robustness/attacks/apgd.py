"""Auto-PGD (Croce & Hein 2020): PGD whose step size adapts itself, on CE or DLR.

* ``apgd`` — the grid's APGD-CE (torchattacks), ``eot_iter`` samples on stochastic models.
* ``apgd-ce``, ``apgd-dlr`` — the portfolio's adaptive APGD on the target's differentiable
  aggregate (:class:`~.surrogates.AggregateView`), ``restarts`` random starts.
* ``apgd-softvote`` — APGD-CE on the soft-vote surrogate (:class:`~.surrogates.SoftVote`).

The portfolio's APGD is our own (:mod:`.apgd_core`, Croce & Hein 2020) with early stop: an
image leaves the batch the moment the target's own scoring (the vote) misclassifies it. For
images it could not break it returns the highest-loss point, where torchattacks would return
the clean image.
"""

from __future__ import annotations

import torch
import torchattacks

from .apgd_core import apgd
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


@register_attack
class APGDCE(Attack):
    """Portfolio APGD (:func:`~.apgd_core.apgd`) on the cross-entropy of the target's
    differentiable aggregate, ``restarts`` runs; each restart tries only the images every
    earlier one left robust. Returns one candidate: the first iterate the target's own
    scoring (``judge``) misclassified, else the last run's highest-loss point."""

    name = "apgd-ce"
    kind = "portfolio"
    loss = "ce"
    surrogate = "aggregate"
    steps = Option(100, "Portfolio: iterations of each adaptive APGD.", field="apgd_steps",
                   minimum=1)
    restarts = Option(1, "Portfolio: random restarts of each adaptive APGD.", field="restarts",
                      minimum=1)
    early_stop = Option(True, "Portfolio: adaptive APGD drops an image the moment the target "
                              "misclassifies it (same records, less time).", field="early_stop")
    attack_aggregate = Option("mean", "differentiable aggregate of an ensemble target",
                              field="attack_aggregate", external=True)

    def view(self, model):
        """The module whose loss is climbed."""
        if self.surrogate == "softvote":
            return SoftVote(model)
        return AggregateView.of(model, self.attack_aggregate)

    def runs(self, model, x, y, *, seed, stochastic, judge, eps, targets=(None,)):
        """``restarts`` APGD runs per target class (``None``: untargeted), each on the images
        every earlier run left unbroken; (adversarial images, broken flags)."""
        view, eot = self.view(model), self.eot_iter if stochastic else 1
        adv, broken = x.clone(), torch.zeros(len(y), dtype=torch.bool, device=y.device)
        for k, target in enumerate(t for t in targets for _ in range(self.restarts)):
            todo = (~broken).nonzero().flatten()
            if todo.numel() == 0:
                break
            gen = torch.Generator(device=x.device).manual_seed((seed + k) % (2**63))
            found, fooled = apgd(view, x[todo], y[todo], eps=eps, steps=self.steps,
                                 loss=self.loss, generator=gen, eot_iter=eot, judge=judge,
                                 target=None if target is None else target[todo],
                                 early_stop=self.early_stop)
            adv[todo], broken[todo] = found, fooled
        return adv, broken

    def craft(self, model, x, y, *, eps, seed, stochastic, generator, judge):
        return [self.runs(model, x, y, seed=seed, stochastic=stochastic, judge=judge, eps=eps)[0]]


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
