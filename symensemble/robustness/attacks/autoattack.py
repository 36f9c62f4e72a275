"""AutoAttack (Croce & Hein 2020), torchattacks' port, L∞, for the ``autoattack`` protocol.

``standard``: APGD-CE, APGD-T, FAB-T, Square (5000 queries) — slow on CPU. On a stochastic
model the ``rand`` version (APGD-CE and APGD-DLR with 20 EOT samples) is used instead, as the
AutoAttack authors prescribe for randomized defenses.
"""

from __future__ import annotations

from typing import ClassVar

import torchattacks

from .registry import GridAttack, register_attack

__all__ = ["AutoAttack", "AutoAttackRand"]


@register_attack
class AutoAttack(GridAttack):
    """AutoAttack ``standard`` (``rand`` on stochastic models)."""

    name = "autoattack"
    iterative = False
    default_steps = None
    version: ClassVar[str] = "standard"

    def build(self, model, *, eps, seed=0, stochastic=False):
        version = "rand" if stochastic else self.version
        return torchattacks.AutoAttack(model, norm="Linf", eps=eps, version=version,
                                       n_classes=self.num_classes, seed=seed)


@register_attack
class AutoAttackRand(AutoAttack):
    """AutoAttack ``rand`` version (APGD-CE + APGD-DLR, 20 EOT samples), always."""

    name = "autoattack-rand"
    version: ClassVar[str] = "rand"
