"""FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps.

``fgsm`` is the paper grid's attack (App. I); ``fgsm-transfer`` is the same step crafted once
per batch on the base model and shared by every target (the paper's threat, in the
portfolio). On a stochastic model both take one EOT-averaged step (EOT-PGD, 1 step, no start).
"""

from __future__ import annotations

import torchattacks

from .registry import GridAttack, register_attack

__all__ = ["FGSM", "TransferFGSM"]


@register_attack
class FGSM(GridAttack):
    """Fast Gradient Sign Method: ``x + eps · sign ∇_x CE(f(x), y)``, clipped to [0, 1]."""

    name = "fgsm"
    iterative = False
    default_steps = 1

    def build(self, model, *, eps, seed=0, stochastic=False):
        if stochastic:
            return torchattacks.EOTPGD(model, eps=eps, alpha=eps, steps=1, eot_iter=self.eot_iter,
                                       random_start=False)
        return torchattacks.FGSM(model, eps=eps)


@register_attack
class TransferFGSM(FGSM):
    """The paper's single-step FGSM on the base model, transferred to every target."""

    name = "fgsm-transfer"
    kind = "portfolio"
    shared = True
