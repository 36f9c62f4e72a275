"""Value objects and constants of a robustness evaluation, and its result.

Holds the names shared by the evaluation, the threat models, the sanity checks and the reports:
the row labels (:data:`ORIGINAL`, :data:`WHITEBOX`, :data:`WORST`), the default grids,
:func:`parse_eps` / :func:`format_eps`, the grid point :class:`Strength`, the evaluated
:class:`Target`, one measured :class:`Record` with its :func:`wilson_interval`, and the
:class:`EvaluationResult` that :func:`symensemble.evaluate` returns
(:func:`symensemble.robustness.report.load_results` reads one back). Importing it does not
load torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..vocab import (
    DEFAULT_TRANSFORMS,
    ORIGINAL,
    PAPER_FGSM_EPS,
    THREATS,
    WHITEBOX,
    WORST,
    format_eps,
    parse_eps,
)

if TYPE_CHECKING:
    from torch import nn

    from .config import EvalConfig

__all__ = [
    "EvaluationResult",
    "Record",
    "Strength",
    "Target",
    "wilson_interval",
    "parse_eps",
    "format_eps",
    "ORIGINAL",
    "WHITEBOX",
    "WORST",
    "THREATS",
    "DEFAULT_TRANSFORMS",
    "PAPER_FGSM_EPS",
    "transform_choices",
]

_Z95 = 1.959963984540054


def transform_choices() -> list[str]:
    """The names an evaluation accepts as transforms: :data:`ORIGINAL` and the ensemble's.

    Imports :mod:`symensemble.ensembles.ensemble` (and so torch) only when called.
    """
    from ..ensembles.ensemble import TRANSFORMS

    return [ORIGINAL, *TRANSFORMS]


# --------------------------------------------------------------------------------------------
# Small value objects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Strength:
    """One point of the attack grid: attack name, L∞ radius, steps and step size."""

    attack: str
    eps: float
    steps: int | None
    alpha: float | None = None

    @property
    def clean(self) -> bool:
        """No perturbation at all: eps = 0 or zero steps."""
        return self.eps == 0.0 or self.steps == 0

    @property
    def key(self) -> str:
        """Stable text key; seeds derive from it, so a strength is attacked alike in any grid."""
        return f"{self.attack}|{self.eps!r}|{self.steps}|{self.alpha!r}"


@dataclass
class Target:
    """A model under evaluation: the base model or one symmetry ensemble."""

    transform: str
    module: nn.Module
    num_members: int | None = None
    ensemble_eps: float | None = None

    @property
    def is_base(self) -> bool:
        return self.transform == ORIGINAL

    @property
    def stochastic(self) -> bool:
        """Whether the module draws fresh members on every forward (then attacks use EOT)."""
        return bool(getattr(self.module, "is_stochastic", False))

    @property
    def key(self) -> str:
        if self.is_base:
            return ORIGINAL
        return f"{self.transform}|G={self.num_members}|eps={self.ensemble_eps!r}"


@dataclass
class Record:
    """One measured accuracy: a target under a threat model at one attack strength.

    ``accuracy = correct / n`` with its 95% Wilson interval ``[ci_low, ci_high]``.
    ``num_members`` and ``ensemble_eps`` are ``None`` for the base model. In the portfolio
    protocol, ``threat`` names the attack of the cascade (or ``robust``), ``accuracy`` is the
    share of images robust after it and every earlier attack, and ``broken`` counts the
    images this attack broke that every earlier one left robust.
    """

    transform: str
    threat: str
    attack: str
    eps: float
    steps: int | None
    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    correct: int
    num_members: int | None = None
    ensemble_eps: float | None = None
    alpha: float | None = None
    broken: int | None = None

    @property
    def key(self) -> tuple:
        """(transform, num_members, ensemble_eps, threat, attack, eps, steps): one row."""
        return (self.transform, self.num_members, self.ensemble_eps, self.threat, self.attack,
                self.eps, self.steps)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["broken"] is None:  # only portfolio rows say how many images their attack broke
            del out["broken"]
        return out


def wilson_interval(correct: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    Returns ``(0, 1)`` when ``n`` is 0.
    """
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo = 0.0 if correct <= 0 else max(0.0, center - half)
    hi = 1.0 if correct >= n else min(1.0, center + half)
    return lo, hi


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


@dataclass
class EvaluationResult:
    """Everything one evaluation produced.

    Attributes:
        settings: resolved settings, versions, git revision, timings.
        records: measured accuracies, one per (target, threat, strength).
        warnings: sanity-check findings (empty when all checks pass).
        probes: extra measurements the sanity checks ran (large-eps PGD, single-step
            references); not part of the requested grid.
        config: the :class:`~symensemble.robustness.config.EvalConfig` that was run (rebuilt from
            ``settings`` by :func:`~symensemble.robustness.report.load_results`).
        flags: per-image correctness, one bool tensor (n,) per record, keyed by
            :meth:`Record.key` (not written to disk). ANDs of these give any worst case.
    """

    settings: dict[str, Any]
    records: list[Record]
    warnings: list[str] = field(default_factory=list)
    probes: list[Record] = field(default_factory=list)
    config: EvalConfig | None = None
    flags: dict[tuple, Any] = field(default_factory=dict, repr=False)

    def select(self, **filters: Any) -> list[Record]:
        """Records whose fields equal every given value, e.g. ``select(transform="group")``."""
        return [r for r in self.records if all(getattr(r, k) == v for k, v in filters.items())]

    def accuracy(self, transform: str, threat: str | None = None, **filters: Any) -> float:
        """The one accuracy matching ``transform``, ``threat`` and ``filters``.

        ``threat`` defaults to ``robust`` (portfolio results: survives every attack), else to
        ``whitebox`` for the base model and ``transfer`` for ensembles.

        Raises:
            KeyError: no record or more than one matches.
        """
        portfolio = any(r.attack == "portfolio" for r in self.records)
        if threat is None:
            threat = "robust" if portfolio else WHITEBOX if transform == ORIGINAL else "transfer"
        if transform == ORIGINAL and not portfolio:
            threat = WHITEBOX
        found = self.select(transform=transform, threat=threat, **filters)
        if len(found) != 1:
            raise KeyError(
                f"{len(found)} records match transform={transform!r} threat={threat!r} {filters}; "
                "narrow the filters (eps=, steps=, attack=, num_members=, ensemble_eps=)"
            )
        return found[0].accuracy

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "records": [r.to_dict() for r in self.records],
            "warnings": list(self.warnings),
            "probes": [r.to_dict() for r in self.probes],
        }
