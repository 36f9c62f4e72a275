"""The plan of an evaluation: typed units of work, each measuring per-image flags.

A :class:`Unit` is one attack strength with the :class:`Measure` rows it fills: for every
measure the runner returns one boolean per test image (correct after that attack). Records
are then sums of flags, and combined rows — the ``worst`` case over threat models, the
portfolio's ``robust`` row — are ANDs of flags, never special cases inside the batch loop.

Two kinds of unit:

* ``GRID`` (protocols ``paper`` and ``autoattack``, and sanity probes): each measure is one
  threat model on one target (``whitebox`` for the base, ``transfer`` / ``adaptive`` for
  ensembles), each run on every image.
* ``PORTFOLIO``: each measure is one attack of the cascade on one target
  (:mod:`symensemble.robustness.attacks.portfolio`, a list of registered attacks); the runner
  stores, per attack, the images still robust after it and every earlier one.

:class:`Role` says whether a unit's rows are results (``RECORD``) or extra measurements the
sanity checks read (``PROBE``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..vocab import CLEAN, ROBUST, WHITEBOX
from .attacks import Attack, get_attack, portfolio_attacks
from .config import EvalConfig
from .records import Strength, Target
from .sanity import LARGE_EPS, LARGE_EPS_STEPS

__all__ = ["Role", "Kind", "Measure", "Unit", "plan", "grid_strengths", "ROBUST", "CLEAN"]


class Role(enum.Enum):
    RECORD = "record"
    PROBE = "probe"


class Kind(enum.Enum):
    GRID = "grid"
    PORTFOLIO = "portfolio"


@dataclass(frozen=True)
class Measure:
    """One row of per-image flags: ``label`` (threat model or attack) on ``target``."""

    label: str
    target: Target


@dataclass
class Unit:
    """One strength of the evaluation and the measures it fills."""

    role: Role
    kind: Kind
    strength: Strength
    measures: list[Measure]
    components: list[Attack] = field(default_factory=list)
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.role.value}:{self.strength.key}"


def grid_strengths(config: EvalConfig) -> list[Strength]:
    """The ``paper`` grid: attack × eps × steps, with each attack's resolved step size."""
    out: list[Strength] = []
    for name in config.attack:
        preset = type(get_attack(name))
        step_values = list(config.steps) if (preset.iterative and config.steps) else [
            preset.resolve_steps(None)]
        for eps in config.eps:
            for steps in step_values:
                a = preset.resolve_alpha(eps, steps, config.alpha) if eps > 0 and steps != 0 else None
                out.append(Strength(preset.name, eps, steps, a))
    return list(dict.fromkeys(out))


def _grid_measures(targets: list[Target], threats: tuple[str, ...]) -> list[Measure]:
    base, ensembles = targets[0], targets[1:]
    return [Measure(WHITEBOX, base)] + [Measure(th, t) for t in ensembles for th in threats]


def _portfolio_unit(role: Role, eps: float, targets: list[Target], comps: list[Attack]
                    ) -> Unit:
    strength = Strength("portfolio", eps, None)
    if strength.clean:
        return Unit(role, Kind.PORTFOLIO, strength, [Measure(ROBUST, t) for t in targets])
    measures = [Measure(label, t) for t in targets for label in (CLEAN, *(c.name for c in comps))]
    return Unit(role, Kind.PORTFOLIO, strength, measures, comps)


def _large_eps_probe(targets: list[Target], threats: tuple[str, ...]) -> Unit:
    strength = Strength("pgd", LARGE_EPS, LARGE_EPS_STEPS,
                        get_attack("pgd").resolve_alpha(LARGE_EPS, LARGE_EPS_STEPS, None))
    measures = [Measure(WHITEBOX, targets[0])]
    if "adaptive" in threats:
        measures += [Measure("adaptive", t) for t in targets[1:]]
    return Unit(Role.PROBE, Kind.GRID, strength, measures,
                note=f"adaptive PGD-{LARGE_EPS_STEPS} at eps=64/255")


def plan(config: EvalConfig, targets: list[Target]) -> list[Unit]:
    """The units of an evaluation of ``targets`` under ``config``, results first, then probes."""
    if config.protocol == "portfolio":
        comps = portfolio_attacks(config)
        units = [_portfolio_unit(Role.RECORD, e, targets, comps) for e in config.eps]
        if config.sanity:
            units.append(_large_eps_probe(targets, ("adaptive",)))
            if 0.0 not in config.eps:
                probe = _portfolio_unit(Role.PROBE, 0.0, targets, comps)
                probe.note = "clean accuracy"
                units.append(probe)
        return units
    strengths = grid_strengths(config)
    measures = _grid_measures(targets, config.threat)
    units = [Unit(Role.RECORD, Kind.GRID, s, measures) for s in strengths]
    attacked = [s for s in strengths if not s.clean]
    if not (config.sanity and attacked):
        return units
    probe = _large_eps_probe(targets, config.threat)
    if probe.strength not in strengths:
        units.append(probe)
    if len(attacked) == len(strengths):  # no clean point: the checks need clean accuracy
        first = config.attack[0]
        clean = Strength(first, 0.0, get_attack(first).resolve_steps(None))
        units.append(Unit(Role.PROBE, Kind.GRID, clean, measures, note="clean accuracy"))
    if "fgsm" not in config.attack:
        ref_eps = sorted({s.eps for s in attacked if s.attack != "fgsm"})
        for i, e in enumerate(ref_eps):
            note = "single-step FGSM references at the grid's eps" if i == 0 else ""
            units.append(Unit(Role.PROBE, Kind.GRID, Strength("fgsm", e, 1, None), measures,
                              note=note))
    return units
