"""Threat models: which model's gradients craft the adversarial examples for a target.

* ``transfer`` (:class:`Transfer`) — crafted once per strength on the base model, shared by
  every transform (the paper's protocol).
* ``adaptive`` (:class:`Adaptive`) — crafted on each ensemble itself, through its
  differentiable aggregate (:class:`DifferentiableView`).

:func:`get_threat` looks one up by name; :func:`list_threats` lists the names.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from .attacks.surrogates import AggregateView
from .records import Target

__all__ = ["ThreatModel", "Transfer", "Adaptive", "DifferentiableView", "get_threat", "list_threats"]


#: An ensemble seen through a differentiable aggregate (majority vote has no useful gradient,
#: so adaptive attacks differentiate ``mean`` while accuracy is still counted with the vote).
DifferentiableView = AggregateView


class ThreatModel:
    """Base class: which model's gradients craft the adversarial examples for a target."""

    name: ClassVar[str] = ""

    def source(self, base: Target, target: Target, attack_aggregate: str = "mean"
               ) -> tuple[str, nn.Module, bool]:
        """The attacked model for ``target``.

        Returns:
            (key, module, stochastic): a key shared by every target attacked through the same
            model (so examples are crafted once), the module to differentiate, and whether it
            is stochastic (the attack then uses EOT).
        """
        raise NotImplementedError


class Transfer(ThreatModel):
    """Examples crafted on the base model, shared by every transform (the paper's protocol)."""

    name: ClassVar[str] = "transfer"

    def source(self, base, target, attack_aggregate="mean"):
        return base.key, base.module, base.stochastic


class Adaptive(ThreatModel):
    """White-box attack on each ensemble's own differentiable output (EOT if stochastic)."""

    name: ClassVar[str] = "adaptive"

    def source(self, base, target, attack_aggregate="mean"):
        if target.is_base:
            return base.key, base.module, base.stochastic
        return target.key, DifferentiableView(target.module, attack_aggregate), target.stochastic


_THREAT_MODELS: dict[str, ThreatModel] = {t.name: t for t in (Transfer(), Adaptive())}


def list_threats() -> list[str]:
    """Names accepted by :func:`get_threat` (and ``--threat``)."""
    return list(_THREAT_MODELS)


def get_threat(name: str) -> ThreatModel:
    """The threat model called ``name``.

    Raises:
        ValueError: unknown name.
    """
    key = str(name).strip().lower()
    if key not in _THREAT_MODELS:
        raise ValueError(f"unknown threat model {name!r}; expected one of {list_threats()}")
    return _THREAT_MODELS[key]
