"""Attack presets: one small object per attack, chosen by name, that builds a torchattacks attack.

Every preset turns resolved hyperparameters (L∞ radius ``eps`` in [0, 1] pixel units, number
of ``steps``, step size ``alpha``) into a configured :mod:`torchattacks` attack on a model
taking images in [0, 1] (symensemble models normalize inside, so ``set_normalization_used``
is never needed). When the attacked model is *stochastic* (an ensemble that redraws its
members on every forward) the preset switches to its Expectation-over-Transformation form
(Athalye et al. 2018): FGSM and PGD become EOT-PGD, APGD gets ``eot_iter``, AutoAttack its
``rand`` version.

    >>> preset = get_attack("pgd")
    >>> atk = preset.build(model, eps=8 / 255, steps=10, alpha=None, seed=0)
    >>> adv = atk(images, labels)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torchattacks
from torch import nn

__all__ = [
    "AttackPreset",
    "FGSM",
    "PGD",
    "APGD",
    "EOTPGD",
    "AutoAttack",
    "AutoAttackRand",
    "get_attack",
    "list_attacks",
    "default_alpha",
    "DEFAULT_EOT_ITER",
]

#: EOT samples per gradient when the attacked model is stochastic.
DEFAULT_EOT_ITER = 10


def default_alpha(eps: float, steps: int) -> float:
    """Step size ``2.5 · eps / steps`` (Madry et al. 2018): enough to cross the ball and back.

    For the common PGD-10 at eps = 8/255 this gives 2/255, torchattacks' default.
    """
    return 2.5 * eps / max(int(steps), 1)


@dataclass(frozen=True)
class AttackPreset:
    """Base class: an L∞ attack from torchattacks, with its defaults as plain attributes.

    Attributes:
        name: the name users pass (``--attack``).
        iterative: whether ``steps`` is meaningful (False for FGSM and AutoAttack).
        default_steps: steps used when the user gives none (``None``: not applicable).
        random_start: PGD-style uniform random start inside the eps ball.
    """

    name: ClassVar[str] = ""
    iterative: ClassVar[bool] = True
    default_steps: ClassVar[int | None] = 10
    random_start: bool = True

    def resolve_steps(self, steps: int | None) -> int | None:
        """The number of steps actually run (``None`` for attacks without a step count)."""
        if not self.iterative:
            return self.default_steps
        return self.default_steps if steps is None else int(steps)

    def resolve_alpha(self, eps: float, steps: int | None, alpha: float | None) -> float | None:
        """The step size actually used: ``alpha`` if given, else :func:`default_alpha`."""
        if not self.iterative or steps is None:
            return None
        return float(alpha) if alpha is not None else default_alpha(eps, steps)

    def build(
        self,
        model: nn.Module,
        *,
        eps: float,
        steps: int | None = None,
        alpha: float | None = None,
        seed: int = 0,
        stochastic: bool = False,
        eot_iter: int = DEFAULT_EOT_ITER,
        num_classes: int = 10,
    ) -> torchattacks.Attack:
        """A configured torchattacks attack on ``model``.

        Args:
            model: maps images (B, 3, H, W) in [0, 1] to logits (B, C); differentiable.
            eps: L∞ radius in [0, 1] pixel units.
            steps: iterations (iterative attacks); ``None`` uses :attr:`default_steps`.
            alpha: step size; ``None`` uses :func:`default_alpha`.
            seed: seed for attacks that reseed themselves (APGD, AutoAttack).
            stochastic: the model draws fresh randomness each forward; use EOT.
            eot_iter: EOT samples per gradient when ``stochastic``.
            num_classes: C (AutoAttack's targeted components need it).
        """
        raise NotImplementedError


def _eotpgd(model: nn.Module, eps: float, alpha: float, steps: int, eot_iter: int,
            random_start: bool) -> torchattacks.Attack:
    return torchattacks.EOTPGD(model, eps=eps, alpha=alpha, steps=steps, eot_iter=eot_iter,
                               random_start=random_start)


@dataclass(frozen=True)
class FGSM(AttackPreset):
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one step of size eps.

    On a stochastic model: one EOT-averaged gradient-sign step (EOT-PGD, 1 step, no start).
    """

    name: ClassVar[str] = "fgsm"
    iterative: ClassVar[bool] = False
    default_steps: ClassVar[int | None] = 1
    random_start: bool = False

    def build(self, model, *, eps, steps=None, alpha=None, seed=0, stochastic=False,
              eot_iter=DEFAULT_EOT_ITER, num_classes=10):
        if stochastic:
            return _eotpgd(model, eps, eps, 1, eot_iter, random_start=False)
        return torchattacks.FGSM(model, eps=eps)


@dataclass(frozen=True)
class PGD(AttackPreset):
    """L∞ Projected Gradient Descent (Madry et al. 2018) with a uniform random start."""

    name: ClassVar[str] = "pgd"

    def build(self, model, *, eps, steps=None, alpha=None, seed=0, stochastic=False,
              eot_iter=DEFAULT_EOT_ITER, num_classes=10):
        steps = self.resolve_steps(steps)
        alpha = self.resolve_alpha(eps, steps, alpha)
        if stochastic:
            return _eotpgd(model, eps, alpha, steps, eot_iter, self.random_start)
        return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps,
                                random_start=self.random_start)


@dataclass(frozen=True)
class EOTPGD(AttackPreset):
    """PGD on the gradient averaged over ``eot_iter`` forwards, always (Athalye et al. 2018)."""

    name: ClassVar[str] = "eotpgd"

    def build(self, model, *, eps, steps=None, alpha=None, seed=0, stochastic=False,
              eot_iter=DEFAULT_EOT_ITER, num_classes=10):
        steps = self.resolve_steps(steps)
        alpha = self.resolve_alpha(eps, steps, alpha)
        return _eotpgd(model, eps, alpha, steps, eot_iter, self.random_start)


@dataclass(frozen=True)
class APGD(AttackPreset):
    """Auto-PGD on cross-entropy (Croce & Hein 2020): step size adapted, no alpha to tune."""

    name: ClassVar[str] = "apgd"

    def resolve_alpha(self, eps, steps, alpha):
        return None  # APGD chooses its own step size

    def build(self, model, *, eps, steps=None, alpha=None, seed=0, stochastic=False,
              eot_iter=DEFAULT_EOT_ITER, num_classes=10):
        steps = self.resolve_steps(steps)
        return torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1,
                                 seed=seed, loss="ce", eot_iter=eot_iter if stochastic else 1)


@dataclass(frozen=True)
class AutoAttack(AttackPreset):
    """AutoAttack (Croce & Hein 2020), torchattacks' port, L∞.

    ``standard``: APGD-CE, APGD-T, FAB-T, Square (5000 queries) — slow on CPU. On a stochastic
    model the ``rand`` version (APGD-CE and APGD-DLR with 20 EOT samples) is used instead,
    as the AutoAttack authors prescribe for randomized defenses.
    """

    name: ClassVar[str] = "autoattack"
    iterative: ClassVar[bool] = False
    default_steps: ClassVar[int | None] = None
    version: ClassVar[str] = "standard"

    def build(self, model, *, eps, steps=None, alpha=None, seed=0, stochastic=False,
              eot_iter=DEFAULT_EOT_ITER, num_classes=10):
        version = "rand" if stochastic else self.version
        return torchattacks.AutoAttack(model, norm="Linf", eps=eps, version=version,
                                       n_classes=num_classes, seed=seed)


@dataclass(frozen=True)
class AutoAttackRand(AutoAttack):
    """AutoAttack ``rand`` version (APGD-CE + APGD-DLR, 20 EOT samples), always."""

    name: ClassVar[str] = "autoattack-rand"
    version: ClassVar[str] = "rand"


_PRESETS: dict[str, AttackPreset] = {
    p.name: p for p in (FGSM(), PGD(), APGD(), EOTPGD(), AutoAttack(), AutoAttackRand())
}


def list_attacks() -> list[str]:
    """Names accepted by :func:`get_attack` (and ``symensemble attack --attack``)."""
    return list(_PRESETS)


def get_attack(name: str) -> AttackPreset:
    """The preset registered as ``name`` (case-insensitive).

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    key = str(name).strip().lower()
    if key not in _PRESETS:
        raise ValueError(f"unknown attack {name!r}; expected one of {list_attacks()}")
    return _PRESETS[key]

