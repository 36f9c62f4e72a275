"""What one robustness evaluation measures: a frozen, self-validating :class:`EvalConfig`.

Built by the CLI (``symensemble attack``), by the ``[evaluate]`` table of an evaluation
recipe (:func:`symensemble.training.recipe.load_evaluation_recipe`) and by Python callers
(``se.evaluate(model, data, n=500)`` forwards its keywords here). Every value is checked once,
here, with a message that names the field and what was expected; :func:`symensemble.evaluate`
trusts a config it is given.

Three protocols (``protocol``):

* ``portfolio`` (default): per strength, an image counts as robust only if it survives every
  attack of a cascade — adaptive APGD-CE, APGD-DLR and APGD on a soft-vote surrogate on each
  target's own output, PGD and FGSM transferred from the base model, optionally Square
  (:mod:`symensemble.robustness.attacks.portfolio`).
* ``paper``: the grid of the paper's App. I — ``attack`` × ``eps`` × ``steps``, each under the
  ``transfer`` and/or ``adaptive`` threat model, plus their per-image ``worst`` case. This is
  what the Figure 10/11 recipes run.
* ``autoattack``: AutoAttack ``standard`` (Croce & Hein 2020) at 8/255 on each target
  (``rand`` on stochastic ones), for RobustBench-style reporting.

Giving ``attack``, ``steps``, ``alpha`` or ``threat`` without a protocol selects ``paper``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..vocab import DEFAULT_TRANSFORMS, ORIGINAL, PAPER_FGSM_EPS, THREATS, parse_eps
from .attacks import attack_options, get_attack, list_attacks

__all__ = ["EvalConfig", "PROTOCOLS", "AGGREGATE_CHOICES", "DIFFERENTIABLE_AGGREGATES"]

PROTOCOLS = ("portfolio", "paper", "autoattack")
AGGREGATE_CHOICES = ("vote", "mean", "logit_mean")
DIFFERENTIABLE_AGGREGATES = ("mean", "logit_mean")
#: Default radii of the portfolio: clean, two of the paper's FGSM radii and the usual 8/255.
PORTFOLIO_EPS = (0.0, 0.006, 0.012, 8 / 255)
AUTOATTACK_EPS = (0.0, 8 / 255)
#: Keywords that only the ``paper`` (grid) protocol reads.
_GRID_ONLY = ("attack", "steps", "alpha", "threat")
#: What protocol ``autoattack`` runs, in the paper grid's terms.
_AUTOATTACK_GRID = {"attack": ("autoattack",), "threat": ("adaptive",)}


def _as_list(value: Any) -> list:
    """A list from one value, a sequence, or a comma-separated string (the CLI's convention)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, bytes) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def _names(value: Any, what: str) -> tuple[str, ...]:
    items = []
    for v in _as_list(value):
        items += [p.strip().lower() for p in str(v).split(",") if p.strip()]  # nested lists too
    if not items:
        raise ValueError(f"{what}: give at least one")
    return tuple(dict.fromkeys(items))


def _ints(value: Any, what: str, minimum: int) -> tuple[int, ...]:
    out = []
    for v in _as_list(value):
        try:
            i = int(v)
            exact = i == float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be integers, got {v!r}") from None
        if not exact or i < minimum:
            raise ValueError(f"{what} must be integers >= {minimum}, got {v!r}")
        out.append(i)
    return tuple(dict.fromkeys(out))


def _int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _radii(value: Any, what: str) -> tuple[float, ...]:
    out = []
    for v in _as_list(value):
        try:
            out.append(parse_eps(v))
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None
    if not out:
        raise ValueError(f"{what}: give at least one radius")
    return tuple(dict.fromkeys(out))


def _nonneg_floats(value: Any, what: str) -> tuple[float, ...]:
    out = []
    for v in _as_list(value):
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be numbers, got {v!r}") from None
        if not (math.isfinite(x) and x >= 0):
            raise ValueError(f"{what} must be finite and non-negative, got {v!r}")
        out.append(x)
    if not out:
        raise ValueError(f"{what}: give at least one value")
    return tuple(dict.fromkeys(out))


def _with_attack_options(cls: type) -> type:
    """Add one field per option the registered attacks declare (``apgd_steps``, ``restarts``,
    ``eot_iter``, ``cascade``, ...: :func:`~.attacks.attack_options`), with its default."""
    for name, opt in attack_options().items():
        cls.__annotations__[name] = type(opt.default).__name__
        setattr(cls, name, opt.default)
    return cls


@dataclass(frozen=True)
@_with_attack_options
class EvalConfig:
    """Everything that defines a robustness evaluation, validated on construction.

    List-valued fields accept a single value, a list, or a comma-separated string, and are
    stored as tuples without duplicates. ``None`` means "the protocol's default" and is
    resolved on construction, so a built config holds the values actually used.

    Attributes:
        protocol: ``portfolio``, ``paper`` or ``autoattack`` (see the module docstring).
        n: test images, seeded and stratified by class.
        eps: L∞ radii in [0, 1] pixel units (``"8/255"`` works); 0 is clean accuracy.
        attack, steps, alpha, threat: the ``paper`` grid: attack names, iteration counts,
            step size, threat models (``transfer``, ``adaptive``).
        transforms: ``original`` (the base model, always evaluated) and ensemble transforms.
        num_members, ensemble_eps: ensemble sizes G and radii ε; lists sweep them.
        aggregate: how ensemble accuracy is counted (``vote``, the paper's, ``mean``,
            ``logit_mean``).
        attack_aggregate: the differentiable output adaptive attacks use (``mean`` or
            ``logit_mean``; default: ``aggregate`` when differentiable, else ``mean``).
        seed: seeds the subset, the calibration draw, the ensembles and the attacks.
        device: torch device string.
        batch_size: images per attack batch.
        resample_members: ensembles redraw members on every forward (stochastic).
        samples_per_member: calibration images per member (default: 2h, twice the head width;
            the paper recipes pin the paper's s = h).
        calibration_noise: std of the Gaussian noise added to the calibration pre-activations
            before π is solved (the authors' notebook: 1e-4; default 0).
        sanity: run the sanity probes.

    The registered attacks' options are fields too, declared once in the attack classes
    (:func:`symensemble.robustness.attacks.attack_options`): ``eot_iter`` (EOT samples per
    gradient on stochastic ensembles), ``apgd_steps`` and ``restarts`` (each adaptive APGD),
    ``transfer_steps`` and ``transfer_restarts`` (PGD crafted on the base model),
    ``square_queries`` (0 leaves Square out) and ``cascade`` (each portfolio attack only tries
    images every earlier attack left robust, as AutoAttack; ``False`` runs each on every
    clean-correct image).
    """

    protocol: str | None = None
    n: int | None = None
    eps: Any = None
    attack: Any = None
    steps: Any = None
    alpha: Any = None
    threat: Any = None
    transforms: Any = DEFAULT_TRANSFORMS
    num_members: Any = 200
    ensemble_eps: Any = 10.0
    aggregate: str = "vote"
    attack_aggregate: str | None = None
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 250
    resample_members: bool = False
    samples_per_member: int | None = None
    calibration_noise: float = 0.0
    sanity: bool = True
    # + one field per attack option of the registry (``_with_attack_options``)

    def __post_init__(self) -> None:
        for name, value in self._resolved().items():
            object.__setattr__(self, name, value)

    # -- validation -------------------------------------------------------------------------

    def _resolved(self) -> dict[str, Any]:
        given_grid = [k for k in _GRID_ONLY if getattr(self, k) is not None]
        protocol = self.protocol or ("paper" if given_grid else "portfolio")
        protocol = str(protocol).strip().lower()
        if protocol == "autoattack":  # its own fill (a copy re-validates it) is no user choice
            given_grid = [k for k in given_grid if _AUTOATTACK_GRID.get(k) != _names(
                getattr(self, k), k)]
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; expected one of {list(PROTOCOLS)}")
        if protocol != "paper" and given_grid:
            raise ValueError(f"{', '.join(given_grid)} only apply to protocol 'paper' (the attack "
                             f"grid), not {protocol!r}; drop them or pass protocol='paper'")
        out: dict[str, Any] = {"protocol": protocol}
        out.update(self._grid(protocol))
        default_n = 500 if protocol == "portfolio" else 1000
        out["n"] = _int(default_n if self.n is None else self.n, "n", 1)
        default_eps = {"portfolio": PORTFOLIO_EPS, "paper": PAPER_FGSM_EPS,
                       "autoattack": AUTOATTACK_EPS}[protocol]
        out["eps"] = _radii(default_eps if self.eps is None else self.eps, "eps")
        out["transforms"] = _names(self.transforms, "transforms")
        out["num_members"] = _ints(self.num_members, "num_members", 1)
        out["ensemble_eps"] = _nonneg_floats(self.ensemble_eps, "ensemble_eps")
        if not out["num_members"]:
            raise ValueError("num_members: give at least one ensemble size")
        out.update(self._aggregates())
        out["batch_size"] = _int(self.batch_size, "batch_size", 1)
        for name, opt in attack_options().items():
            out[name] = opt.validate(getattr(self, name))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.samples_per_member is not None:
            out["samples_per_member"] = _int(self.samples_per_member, "samples_per_member", 1)
        noise = self.calibration_noise
        if (not isinstance(noise, (int, float)) or isinstance(noise, bool)
                or not (math.isfinite(noise) and noise >= 0)):
            raise ValueError(f"calibration_noise must be a finite number >= 0, got {noise!r}")
        out["calibration_noise"] = float(noise)
        out["device"] = str(self.device)
        for flag in ("resample_members", "sanity"):
            out[flag] = bool(getattr(self, flag))
        return out

    def _grid(self, protocol: str) -> dict[str, Any]:
        if protocol == "portfolio":
            return {}
        if protocol == "autoattack":
            return dict(_AUTOATTACK_GRID)
        attack = _names("fgsm" if self.attack is None else self.attack, "attack")
        for name in attack:
            if get_attack(name).kind != "grid":
                raise ValueError(f"attack {name!r} cannot run in the paper grid; expected one of "
                                 f"{list_attacks('grid')}")
        threat = _names(THREATS if self.threat is None else self.threat, "threat")
        for name in threat:
            if name not in THREATS:  # the names of .threats.list_threats()
                raise ValueError(f"unknown threat model {name!r}; expected one of {list(THREATS)}")
        out: dict[str, Any] = {"attack": attack, "threat": threat}
        if self.steps is not None:
            out["steps"] = _ints(self.steps, "steps", 0)
        if self.alpha is not None:
            alpha = parse_eps(self.alpha)
            if alpha <= 0:
                raise ValueError(f"alpha must be a positive step size, got {self.alpha!r}")
            out["alpha"] = alpha
        return out

    def _aggregates(self) -> dict[str, Any]:
        if self.aggregate not in AGGREGATE_CHOICES:
            raise ValueError(f"unknown aggregate {self.aggregate!r}; expected one of "
                             f"{list(AGGREGATE_CHOICES)}")
        attack_aggregate = self.attack_aggregate
        if attack_aggregate is None:
            attack_aggregate = self.aggregate if self.aggregate in DIFFERENTIABLE_AGGREGATES else "mean"
        if attack_aggregate not in DIFFERENTIABLE_AGGREGATES:
            raise ValueError(f"attack_aggregate must be 'mean' or 'logit_mean' (differentiable), "
                             f"got {attack_aggregate!r}")
        return {"attack_aggregate": attack_aggregate}

    # -- views ------------------------------------------------------------------------------

    @property
    def ensemble_transforms(self) -> tuple[str, ...]:
        """The requested transforms other than the base model."""
        return tuple(t for t in self.transforms if t != ORIGINAL)

    def replace(self, **changes: Any) -> EvalConfig:
        """A copy with ``changes`` applied and validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples become lists), as written to ``results.json``."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_mapping(cls, values: dict[str, Any], origin: str = "config",
                     lenient: bool = False) -> EvalConfig:
        """Build from a mapping (a recipe's ``[evaluate]`` table, results.json settings).

        Args:
            values: field names to values.
            origin: where the values came from, for error messages.
            lenient: ignore unknown keys (reading back results) instead of refusing them.

        Raises:
            ValueError: unknown keys (unless ``lenient``) or bad values, prefixed by ``origin``.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown and not lenient:
            raise ValueError(f"{origin}: unknown keys {unknown}; allowed: {sorted(known)}")
        try:
            return cls(**{k: v for k, v in values.items() if k in known})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{origin}: {err}") from None
