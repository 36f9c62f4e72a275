"""APGD-T (Croce & Hein 2020): APGD on the targeted DLR loss, one run per target class.

As AutoAttack ``standard``: the targets are the ``apgd_targets`` (9) classes the surrogate
ranks highest after the top one on the clean image, tried in that order, each only on the
images every earlier target left robust. ``apgd-t`` climbs the target's differentiable
aggregate (``mean``, the mean of the members' softmax outputs, by default — where APGD-T
breaks the most ensemble images); ``apgd-t-softvote`` the soft-vote surrogate. On a model
without members the soft vote only rescales each image's logits, to which DLR is invariant,
so ``apgd-t-softvote`` would repeat ``apgd-t`` and returns no candidate there.
"""

from __future__ import annotations

import torch

from .apgd import APGDCE
from .registry import Option, register_attack

__all__ = ["APGDT", "APGDTSoftVote"]


@register_attack
class APGDT(APGDCE):
    """Targeted APGD-DLR over the top ``targets`` classes, on the target's aggregate."""

    name = "apgd-t"
    loss = "dlr-targeted"
    targets = Option(9, "Portfolio: target classes of each APGD-T (the top-ranked after the "
                        "first, as AutoAttack).", field="apgd_targets", minimum=1)

    def craft(self, model, x, y, *, eps, seed, stochastic, generator, judge):
        if self.surrogate == "softvote" and not hasattr(model, "aggregate"):
            return []  # a plain model: the same losses as apgd-t (DLR is scale-invariant)
        with torch.no_grad():
            order = self.view(model)(x).argsort(dim=1, descending=True)
        if order.shape[1] < 4:
            raise ValueError(f"attack {self.name!r}: the targeted DLR loss needs at least 4 "
                             f"classes, the model has {order.shape[1]}")
        ranks = range(1, min(self.targets, order.shape[1] - 1) + 1)
        adv, _ = self.runs(model, x, y, seed=seed, stochastic=stochastic, judge=judge, eps=eps,
                           targets=[order[:, k] for k in ranks])
        return [adv]


@register_attack
class APGDTSoftVote(APGDT):
    """APGD-T on the soft-vote surrogate of the majority vote."""

    name = "apgd-t-softvote"
    surrogate = "softvote"
