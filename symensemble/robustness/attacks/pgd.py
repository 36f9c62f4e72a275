"""L∞ PGD (Madry et al. 2018) with a uniform random start, and its EOT form.

* ``pgd`` — the grid's PGD; on a stochastic model EOT-PGD (Athalye et al. 2018).
* ``eotpgd`` — PGD on the gradient averaged over ``eot_iter`` forwards, always.
* ``pgd-transfer`` — the portfolio's PGD crafted once per batch on the base model, with
  ``transfer_restarts`` random starts, each a separate candidate shared by every target.
"""

from __future__ import annotations

import torch
import torchattacks

from .registry import GridAttack, Option, default_alpha, register_attack

__all__ = ["PGD", "EOTPGD", "TransferPGD"]


@register_attack
class PGD(GridAttack):
    """x' ← Π_{B_ε(x) ∩ [0,1]}(x' + α · sign ∇ CE), from a uniform random start."""

    name = "pgd"
    random_start = Option(True, "start from a uniform random point of the eps ball")

    def build(self, model, *, eps, seed=0, stochastic=False):
        steps = self.resolve_steps(self.steps)
        alpha = self.resolve_alpha(eps, steps, self.alpha)
        if stochastic:
            return torchattacks.EOTPGD(model, eps=eps, alpha=alpha, steps=steps,
                                       eot_iter=self.eot_iter, random_start=self.random_start)
        return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps,
                                random_start=self.random_start)


@register_attack
class EOTPGD(PGD):
    """PGD on the gradient averaged over ``eot_iter`` forwards, always (Athalye et al. 2018)."""

    name = "eotpgd"

    def build(self, model, *, eps, seed=0, stochastic=False):
        return super().build(model, eps=eps, seed=seed, stochastic=True)


@register_attack
class TransferPGD(GridAttack):
    """PGD on the base model, ``restarts`` random starts, transferred (step 2.5·eps/steps).

    Each restart is a separate candidate: an image survives only if the target classifies all
    of them correctly. Restart r reseeds torch with ``seed + r``.
    """

    name = "pgd-transfer"
    kind = "portfolio"
    shared = True
    steps = Option(20, "Portfolio: PGD iterations crafted on the base model.",
                   field="transfer_steps", minimum=1)
    restarts = Option(1, "Portfolio: PGD restarts crafted on the base model.",
                      field="transfer_restarts", minimum=1)

    def craft(self, model, x, y, *, eps, seed, stochastic, generator, judge):
        out = []
        grid = PGD(steps=self.steps, alpha=default_alpha(eps, self.steps), eot_iter=self.eot_iter)
        for r in range(self.restarts):
            torch.manual_seed((seed + r) % (2**63))
            out.append(grid.build(model, eps=eps, stochastic=stochastic)(x, y).detach())
        return out
