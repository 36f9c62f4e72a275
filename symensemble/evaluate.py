"""Robustness evaluation of a model and its symmetry ensembles under two threat models.

The paper (App. I) crafted adversarial examples on the single model and scored the ensembles
on them: a *transfer* attack. An ensemble that looks robust there may simply not be the
model being attacked, so every evaluation here also runs the *adaptive* attack — the same
attack on the ensemble's own differentiable output (aggregate ``mean``), with
Expectation over Transformation when the ensemble redraws its members on every forward
(Athalye et al. 2018; Carlini et al. 2019; Tramer et al. 2020) — and reports both side by side.

Threat models (one small object each, chosen by name, one entry point :meth:`ThreatModel.source`
giving the model whose gradients craft the examples for a target):

* ``transfer`` — crafted once per strength on the base model, shared by every transform.
* ``adaptive`` — crafted on each ensemble itself.

The base model ("original") is always evaluated as the reference. For it both threat models
are the same white-box attack, so it has one row per strength, with threat ``whitebox``.
When both threat models run, each ensemble also gets a ``worst`` row: the images it classifies
correctly under *every* threat model — robust accuracy against the union of the attacks, the
number to quote (an attack that fails on the ensemble's own gradients, a sign of gradient
masking, cannot inflate it while the transfer attack works).

Accuracy is counted with the aggregate the user chose (``vote`` by default, the paper's
mode of member predictions), with a 95% Wilson interval. Sanity checks run on every
evaluation (:func:`sanity_checks`) and come back as warnings.

    >>> import symensemble as se
    >>> result = se.evaluate("paper_cnn", n=1000, attack="fgsm")
    >>> result.accuracy("group", "transfer", eps=0.012)
"""

from __future__ import annotations

import logging
import math
import os
import platform
import sys
import time
import types
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from . import __version__
from .attacks import DEFAULT_EOT_ITER, AttackPreset, get_attack
from .distributed import DistInfo, all_reduce_sum, init_distributed, rank_device, shard

__all__ = [
    "evaluate",
    "EvaluationResult",
    "Record",
    "Strength",
    "Target",
    "ThreatModel",
    "Transfer",
    "Adaptive",
    "DifferentiableView",
    "get_threat",
    "list_threats",
    "wilson_interval",
    "load_results",
    "EvaluationRecipe",
    "load_evaluation_recipe",
    "resolve_recipe",
    "stratified_subset",
    "sanity_checks",
    "parse_eps",
    "format_eps",
    "ORIGINAL",
    "WHITEBOX",
    "WORST",
    "THREATS",
    "DEFAULT_TRANSFORMS",
    "PAPER_FGSM_EPS",
    "LARGE_EPS",
]

log = logging.getLogger(__name__)

ORIGINAL = "original"
WHITEBOX = "whitebox"
#: Per-image worst case over the threat models evaluated (robust only if it survives all).
WORST = "worst"
THREATS = ("transfer", "adaptive")
DEFAULT_TRANSFORMS = (ORIGINAL, "group", "ginv", "random", "shuffle", "perm_interp")
#: FGSM radii of the paper's Figure 11 (pixel units in [0, 1]).
PAPER_FGSM_EPS = (0.0, 0.003, 0.006, 0.009, 0.012)
#: Radius of the sanity probe at which an adaptive PGD should leave about 0 accuracy.
LARGE_EPS = 64 / 255
#: Accuracy above which the large-eps probe warns.
LARGE_EPS_MAX_ACCURACY = 0.05
#: PGD steps of the large-eps probe.
LARGE_EPS_STEPS = 10
_AGGREGATES = ("vote", "mean", "logit_mean")
_Z95 = 1.959963984540054


# --------------------------------------------------------------------------------------------
# Small value objects
# --------------------------------------------------------------------------------------------


def parse_eps(value: str | float | int) -> float:
    """One radius from a number or a fraction string such as ``"8/255"``; must lie in [0, 1].

    Raises:
        ValueError: not a number or fraction, or outside [0, 1].
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        eps = float(value)
    else:
        text = str(value).strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                eps = float(num) / float(den)
            else:
                eps = float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"eps {value!r} is not a number or a fraction like '8/255'") from None
    if not (math.isfinite(eps) and 0.0 <= eps <= 1.0):
        raise ValueError(
            f"eps {value!r} = {eps:g} is outside [0, 1]; eps is in pixel units of images in "
            "[0, 1] (write 8/255 for 8 intensity levels)"
        )
    return eps


def format_eps(eps: float) -> str:
    """A radius as people write it: ``8/255`` for a whole number of levels, else ``0.003``."""
    if eps == 0:
        return "0"
    levels = eps * 255
    if abs(levels - round(levels)) < 1e-6 and round(levels) >= 1:
        return f"{round(levels)}/255"
    return f"{eps:.4g}"


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
    ``num_members`` and ``ensemble_eps`` are ``None`` for the base model.
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
# Threat models
# --------------------------------------------------------------------------------------------


class DifferentiableView(nn.Module):
    """An ensemble seen through a differentiable aggregate, for gradient-based attacks.

    Majority vote has no useful gradient, so adaptive attacks differentiate the ensemble's
    ``mean`` aggregate (log of the mean member softmax) instead; the accuracy is still
    counted with the user's aggregate.

    Shape:
        images (B, 3, H, W) in [0, 1] → (B, C).
    """

    def __init__(self, ensemble: nn.Module, aggregate: str = "mean") -> None:
        super().__init__()
        self.ensemble = ensemble
        self.aggregate = aggregate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        saved = self.ensemble.aggregate
        self.ensemble.aggregate = self.aggregate
        try:
            return self.ensemble(x)
        finally:
            self.ensemble.aggregate = saved


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


# --------------------------------------------------------------------------------------------
# Data: the evaluated subset and the calibration images
# --------------------------------------------------------------------------------------------


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of a seeded random subset of size ``n`` with class proportions preserved.

    Each class gets ``floor(n · share)`` images, the remainder going to the classes with the
    largest fractional quotas; the result is shuffled so batches mix classes. Works when the
    split is ordered by class, as CIFAR-10 class-folder trees are.

    Args:
        labels: int64 (N,) class labels of the split.
        n: subset size, 1 ≤ n ≤ N.
        seed: the draw's seed.

    Returns:
        int64 (n,) indices into the split.

    Raises:
        ValueError: ``n`` outside [1, N].
    """
    labels = labels.detach().cpu().long()
    total = int(labels.numel())
    if not 1 <= n <= total:
        raise ValueError(f"n must be between 1 and the split size {total}, got {n}")
    gen = torch.Generator().manual_seed(int(seed))
    counts = torch.bincount(labels)
    exact = counts.double() * n / total
    quota = exact.floor().long()
    short = n - int(quota.sum())
    if short > 0:
        order = torch.argsort(exact - quota.double(), descending=True, stable=True)
        quota[order[:short]] += 1
    keys = torch.rand(total, generator=gen, dtype=torch.float64)
    order = torch.argsort(labels.double() * 2.0 + keys)  # by class, random within class
    sorted_labels = labels[order]
    starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(total) - starts[sorted_labels]
    chosen = order[rank_in_class < quota[sorted_labels]]
    return chosen[torch.randperm(chosen.numel(), generator=gen)]


def _split_tensors(split: Any, index: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(float images in [0, 1], int64 labels) of a split, optionally indexed."""
    images, labels = split.images, split.labels
    if index is not None:
        images, labels = images[index], labels[index]
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    return images.float(), labels.long()


def _derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from ``seed`` and text parts; independent of grid size and world size."""
    crc = zlib.crc32("|".join(str(p) for p in parts).encode())
    return (int(seed) * 0x9E3779B97F4A7C15 + crc) % (2**63 - 1)


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
    """

    settings: dict[str, Any]
    records: list[Record]
    warnings: list[str] = field(default_factory=list)
    probes: list[Record] = field(default_factory=list)

    def select(self, **filters: Any) -> list[Record]:
        """Records whose fields equal every given value, e.g. ``select(transform="group")``."""
        return [r for r in self.records if all(getattr(r, k) == v for k, v in filters.items())]

    def accuracy(self, transform: str, threat: str | None = None, **filters: Any) -> float:
        """The one accuracy matching ``transform``, ``threat`` and ``filters``.

        ``threat`` defaults to ``whitebox`` for the base model and ``transfer`` otherwise.

        Raises:
            KeyError: no record or more than one matches.
        """
        if threat is None:
            threat = WHITEBOX if transform == ORIGINAL else "transfer"
        if transform == ORIGINAL:
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


# --------------------------------------------------------------------------------------------
# Sanity checks
# --------------------------------------------------------------------------------------------


def _significantly_greater(hi: Record, lo: Record, z: float, tol: float) -> bool:
    """Whether ``hi.accuracy`` exceeds ``lo.accuracy`` by more than ``tol`` and ``z`` std errors."""
    diff = hi.accuracy - lo.accuracy
    if diff <= tol:
        return False
    pooled = (hi.correct + lo.correct) / max(hi.n + lo.n, 1)
    se = math.sqrt(max(pooled * (1 - pooled), 0.0) * (1 / max(hi.n, 1) + 1 / max(lo.n, 1)))
    return se == 0.0 or diff / se > z


def _fmt(field: str, value: Any) -> str:
    return format_eps(value) if field == "eps" else str(value)


def _label(r: Record) -> str:
    who = r.transform if r.num_members is None else (
        f"{r.transform} (G={r.num_members}, ensemble eps={r.ensemble_eps:g})")
    steps = "" if r.steps is None else f", steps={r.steps}"
    return f"{who} / {r.threat} / {r.attack}{steps}"


def sanity_checks(
    records: Sequence[Record],
    probes: Sequence[Record] = (),
    *,
    z: float = 3.0,
    tol: float = 0.01,
    large_eps_max_accuracy: float = LARGE_EPS_MAX_ACCURACY,
    num_classes: int = 10,
) -> list[str]:
    """Signs of a broken or gradient-masked evaluation, as readable warnings.

    Checks (each difference must exceed ``tol`` and ``z`` standard errors, so sampling noise
    does not trigger them). Targets whose clean accuracy is at chance (1/num_classes, within
    the same margin) are skipped: a (nearly) constant classifier keeps its class share under
    any attack, so its rows say nothing about the attack.

    1. ``[non-monotonic]`` accuracy rising with eps (at fixed steps) or with steps (at fixed eps).
    2. ``[iterative-weaker]`` an iterative attack leaving more accuracy than single-step FGSM
       at the same eps.
    3. ``[gradient-masking]`` the adaptive attack leaving more accuracy than the transfer
       attack at the same strength: the ensemble's own gradients are less useful than a
       surrogate's.
    4. ``[large-eps]`` adaptive PGD at eps = 64/255 leaving more than
       ``large_eps_max_accuracy``: at that radius any real classifier is broken.

    Args:
        records: the requested measurements.
        probes: extra measurements (large-eps PGD, FGSM references).
        z: standard errors a difference must exceed.
        tol: absolute accuracy difference a finding must exceed.
        large_eps_max_accuracy: threshold of check 4.
        num_classes: C; chance accuracy is 1/C.

    Returns:
        Warning strings (empty when all checks pass).
    """
    warnings: list[str] = []
    # Targets at chance on clean images are (nearly) constant classifiers: any attack leaves
    # them their class share, so their rows carry no signal about the attack. Skip them.
    chance = 1.0 / max(num_classes, 1)
    at_chance = set()
    for r in list(records) + list(probes):
        if r.eps == 0 or r.steps == 0:
            se = math.sqrt(chance * (1 - chance) / max(r.n, 1))
            if r.accuracy <= chance + max(tol, z * se):
                at_chance.add((r.transform, r.num_members, r.ensemble_eps))
    grid = [r for r in records if (r.transform, r.num_members, r.ensemble_eps) not in at_chance]
    everything = grid + [r for r in probes
                         if (r.transform, r.num_members, r.ensemble_eps) not in at_chance]

    # 1. monotonic in eps (fixed steps) and in steps (fixed eps)
    for vary, fixed in (("eps", "steps"), ("steps", "eps")):
        series: dict[tuple, list[Record]] = defaultdict(list)
        for r in grid:
            if vary == "steps" and r.steps is None:
                continue
            key = (r.attack, r.transform, r.threat, r.num_members, r.ensemble_eps,
                   getattr(r, fixed))
            series[key].append(r)
        for points in series.values():
            points.sort(key=lambda r: getattr(r, vary))
            lowest = points[0]
            for r in points[1:]:
                if _significantly_greater(r, lowest, z, tol):
                    warnings.append(
                        f"[non-monotonic] {_label(r)}: accuracy rises from {lowest.accuracy:.3f} "
                        f"at {vary}={getattr(lowest, vary):g} to {r.accuracy:.3f} at "
                        f"{vary}={getattr(r, vary):g}; a stronger attack should not help the "
                        "model (gradient masking, or a too large/small step size)"
                    )
                    break
                if r.accuracy < lowest.accuracy:
                    lowest = r

    # 2. iterative attack weaker than single-step FGSM at the same eps
    fgsm = {(r.transform, r.threat, r.num_members, r.ensemble_eps, r.eps): r
            for r in everything if r.attack == "fgsm" and r.eps > 0}
    for r in grid:
        if r.attack == "fgsm" or r.eps == 0 or r.steps == 0:
            continue
        ref = fgsm.get((r.transform, r.threat, r.num_members, r.ensemble_eps, r.eps))
        if ref is not None and _significantly_greater(r, ref, z, tol):
            warnings.append(
                f"[iterative-weaker] {_label(r)} at eps={format_eps(r.eps)} leaves {r.accuracy:.3f} "
                f"accuracy but single-step FGSM leaves {ref.accuracy:.3f}; an iterative attack "
                "should be at least as strong (too small a step size, too few steps, or "
                "gradient masking)"
            )

    # 3. adaptive weaker than transfer at the same strength
    transfer = {(r.attack, r.transform, r.num_members, r.ensemble_eps, r.eps, r.steps): r
                for r in everything if r.threat == "transfer"}
    for r in everything:
        if r.threat != "adaptive" or r.eps == 0 or r.steps == 0:
            continue
        ref = transfer.get((r.attack, r.transform, r.num_members, r.ensemble_eps, r.eps, r.steps))
        if ref is not None and _significantly_greater(r, ref, z, tol):
            warnings.append(
                f"[gradient-masking] {_label(r)} at eps={format_eps(r.eps)} leaves {r.accuracy:.3f} "
                f"accuracy, more than the transfer attack from the base model "
                f"({ref.accuracy:.3f}); the ensemble's own gradients are less useful than a "
                "surrogate's — do not trust the adaptive number as a robustness claim"
            )

    # 4. PGD at a large eps must break the model
    for r in everything:
        if (r.attack == "pgd" and abs(r.eps - LARGE_EPS) < 1e-9
                and r.threat in ("adaptive", WHITEBOX) and r.accuracy > large_eps_max_accuracy):
            warnings.append(
                f"[large-eps] {_label(r)} at eps={format_eps(r.eps)} leaves {r.accuracy:.3f} "
                f"accuracy (expected about 0, at most {large_eps_max_accuracy:g}); the attack "
                "does not work on this model — gradient masking or a broken pipeline"
            )
    return warnings


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def _names(value: Any, what: str) -> list[str]:
    items = []
    for v in _as_list(value):
        items += [p.strip().lower() for p in str(v).split(",") if p.strip()]
    if not items:
        raise ValueError(f"{what}: give at least one")
    return list(dict.fromkeys(items))


def _positive_ints(value: Any, what: str, allow_zero: bool = False) -> list[int]:
    out = []
    for v in _as_list(value):
        try:
            i = int(v)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be integers, got {v!r}") from None
        if i != float(v) or i < (0 if allow_zero else 1):
            raise ValueError(f"{what} must be {'non-negative' if allow_zero else 'positive'} "
                             f"integers, got {v!r}")
        out.append(i)
    return list(dict.fromkeys(out))


def _default_ensemble_factory(model: nn.Module, calibration: torch.Tensor, **kw: Any) -> nn.Module:
    from .ensemble import SymmetryEnsemble

    return SymmetryEnsemble(model, calibration, **kw)


def _known_transforms() -> tuple[str, ...] | None:
    try:
        from .ensemble import TRANSFORMS
    except ImportError:  # pragma: no cover - ensemble module missing
        return None
    return tuple(TRANSFORMS)


def _versions() -> dict[str, str]:
    import torchattacks

    return {
        "symensemble": __version__,
        "torch": torch.__version__,
        "torchattacks": getattr(torchattacks, "__version__", "unknown"),
        "python": platform.python_version(),
    }


def _load_model(model: nn.Module | str | os.PathLike, device: torch.device
                ) -> tuple[nn.Module, dict[str, Any]]:
    if isinstance(model, nn.Module):
        info = {"checkpoint": None,
                "model_name": getattr(model, "model_name", type(model).__name__),
                "model_args": getattr(model, "model_args", {})}
        return model.to(device).eval(), info
    from .checkpoint import load_model

    loaded, meta = load_model(model, device=device, with_info=True)
    info = {"checkpoint": meta["path"], "model_name": meta["model_name"],
            "model_args": meta["model_args"], "checkpoint_git_revision": meta.get("git_revision"),
            "checkpoint_metrics": meta.get("metrics")}
    return loaded, info


def _load_data(data: Any) -> Any:
    if data is None or isinstance(data, (str, os.PathLike)):
        from .data import load_cifar10

        # no validation hold-out: evaluation draws test images and training-split calibration
        return load_cifar10(data, val_size=0)
    for attr in ("train", "test"):
        if not hasattr(data, attr):
            raise ValueError(
                f"data must be a path, None (use $SYMENSEMBLE_DATA) or a dataset with .train and "
                f".test splits, got {type(data).__name__} without .{attr}"
            )
    return data


class _Runner:
    """Runs strengths × batches, counting correct predictions per (strength, threat, target)."""

    def __init__(self, *, base: Target, targets: list[Target], threats: list[str], seed: int,
                 eot_iter: int, num_classes: int, attack_aggregate: str) -> None:
        self.base = base
        self.targets = targets  # base first
        self.threats = threats
        self.seed = seed
        self.eot_iter = eot_iter
        self.num_classes = num_classes
        self.attack_aggregate = attack_aggregate
        self._clean_cache: dict[tuple[int, str], torch.Tensor] = {}

    @staticmethod
    def _reseed(module: nn.Module, seed: int) -> None:
        """Seed torch and, for a stochastic ensemble, its own member generator.

        Members redrawn on every forward continue the ensemble's generator stream; reseeding it
        per batch makes the draws independent of which batches ran before (and so of the
        number of processes).
        """
        torch.manual_seed(seed)
        if getattr(module, "is_stochastic", False) and hasattr(module, "resample"):
            module.resample(seed=seed % (2**63))

    def _predict(self, target: Target, x: torch.Tensor, *seed_parts: Any) -> torch.Tensor:
        if target.stochastic:
            self._reseed(target.module, _derive_seed(self.seed, "predict", target.key, *seed_parts))
        with torch.no_grad():
            return target.module(x).argmax(dim=1)

    def run_batch(self, strength: Strength, slots: list[tuple[str, Target]], x: torch.Tensor,
                  y: torch.Tensor, batch_index: int) -> list[int]:
        """Correct counts on one batch for each (threat, target) slot.

        A ``worst`` slot counts the images its target classifies correctly under every
        threat model listed before it for that target (the per-image worst case).
        """
        correct: dict[tuple[str, str], torch.Tensor] = {}
        out = []
        preset = None if strength.clean else get_attack(strength.attack)
        adversarial: dict[str, torch.Tensor] = {}
        for threat, target in slots:
            if threat == WORST:
                ok = torch.ones_like(y, dtype=torch.bool)
                for (th, key), value in correct.items():
                    if key == target.key and th != WORST:
                        ok = ok & value
            elif strength.clean:
                cache_key = (batch_index, target.key)
                if cache_key not in self._clean_cache:
                    self._clean_cache[cache_key] = (
                        self._predict(target, x, "clean", batch_index) == y)
                ok = self._clean_cache[cache_key]
            else:
                model = get_threat("transfer" if threat == WHITEBOX else threat)
                src_key, src_module, stochastic = model.source(self.base, target,
                                                               self.attack_aggregate)
                if src_key not in adversarial:
                    seed = _derive_seed(self.seed, strength.key, batch_index, src_key)
                    self._reseed(target.module if stochastic else src_module, seed)
                    attack = preset.build(src_module, eps=strength.eps, steps=strength.steps,
                                          alpha=strength.alpha, seed=seed % (2**31),
                                          stochastic=stochastic, eot_iter=self.eot_iter,
                                          num_classes=self.num_classes)
                    adversarial[src_key] = attack(x, y).detach()
                pred = self._predict(target, adversarial[src_key], strength.key, batch_index,
                                     src_key)
                ok = pred == y
            correct[(threat, target.key)] = ok
            out.append(int(ok.sum()))
        return out


def _strengths(attacks: list[str], eps_list: list[float], steps_list: list[int],
               alpha: float | None) -> list[Strength]:
    out: list[Strength] = []
    for name in attacks:
        preset: AttackPreset = get_attack(name)
        if preset.iterative and steps_list:
            step_values = steps_list
        else:
            step_values = [preset.resolve_steps(None)]
        for eps in eps_list:
            for steps in step_values:
                a = preset.resolve_alpha(eps, steps, alpha) if eps > 0 and steps != 0 else None
                out.append(Strength(preset.name, eps, steps, a))
    return list(dict.fromkeys(out))


def evaluate(
    model: nn.Module | str | os.PathLike = "paper_cnn",
    data: Any = None,
    *,
    n: int = 1000,
    attack: str | Sequence[str] = "fgsm",
    eps: float | str | Sequence[float | str] = PAPER_FGSM_EPS,
    steps: int | Sequence[int] | None = None,
    alpha: float | str | None = None,
    transforms: str | Sequence[str] = DEFAULT_TRANSFORMS,
    num_members: int | Sequence[int] = 200,
    ensemble_eps: float | Sequence[float] = 10.0,
    aggregate: str = "vote",
    threat: str | Sequence[str] = THREATS,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 250,
    eot_iter: int = DEFAULT_EOT_ITER,
    resample_members: bool = False,
    samples_per_member: int | None = None,
    sanity: bool = True,
    progress: bool = False,
    ensemble_factory: Callable[..., nn.Module] | None = None,
    attack_aggregate: str | None = None,
) -> EvaluationResult:
    """Measure the accuracy of a model and its symmetry ensembles under attack.

    For every attack strength (eps × steps) the base model is attacked white-box; each
    ensemble is scored on those same examples (``transfer``) and attacked itself
    (``adaptive``). Under ``torchrun`` the batches are sharded across ranks and the counts
    summed; the result equals the single-process one.

    Args:
        model: a model (images in [0, 1] → logits; moved to ``device``, put in eval mode
            during the run and restored after) or a checkpoint path / shipped name.
        data: a CIFAR-10 source path, ``None`` ($SYMENSEMBLE_DATA or the cache), or a loaded
            dataset with ``.train`` and ``.test`` splits (``.images``, ``.labels``).
        n: test images, drawn with ``seed`` and stratified by class.
        attack: attack name(s): fgsm, pgd, apgd, eotpgd, autoattack, autoattack-rand.
        eps: L∞ radii in [0, 1] pixel units; numbers or strings such as ``"8/255"``.
        steps: iteration counts for iterative attacks (a grid); ``None``: each attack's default.
            0 means no attack (clean accuracy).
        alpha: step size; ``None`` uses 2.5·eps/steps.
        transforms: "original" (the base model) and ensemble transforms (group, ginv, random,
            shuffle, perm_interp, ...). The base model is always evaluated as the reference.
        num_members: ensemble sizes G (a list sweeps them).
        ensemble_eps: ensemble radii ε of g = I + εM (a list sweeps them).
        aggregate: how ensemble accuracy is counted: vote, mean or logit_mean.
        threat: "transfer", "adaptive" or both.
        seed: seeds the subset, the calibration draw, the ensembles and the attacks.
        device: torch device ("cuda" picks this rank's GPU under torchrun).
        batch_size: images per attack batch.
        eot_iter: EOT samples per gradient for stochastic ensembles.
        resample_members: ensembles redraw their members on every forward (stochastic).
        samples_per_member: calibration images per member (default: the hidden width h).
        sanity: run the sanity probes (large-eps PGD; FGSM references for iterative attacks).
            The checks on the requested records always run.
        progress: show a tqdm bar over the grid (rank 0 only).
        ensemble_factory: ``fn(model, calibration, *, transform, num_members, eps,
            samples_per_member, seed, aggregate, resample_on_forward) -> nn.Module``;
            defaults to :class:`symensemble.SymmetryEnsemble`.
        attack_aggregate: the differentiable aggregate adaptive attacks differentiate,
            ``mean`` or ``logit_mean``; ``None``: ``aggregate`` itself when it is
            differentiable, else ``mean``. Accuracy is still counted with ``aggregate``.

    Returns:
        An :class:`EvaluationResult` (identical on every rank).

    Raises:
        ValueError: a bad argument (the message names it and what was expected).
        symensemble.checkpoint.CheckpointError, symensemble.data.DataError: bad model or data.
    """
    started = time.perf_counter()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    # ---- validate everything before touching data or models
    attacks = _names(attack, "attack")
    for name in attacks:
        get_attack(name)
    eps_list = list(dict.fromkeys(parse_eps(e) for e in _as_list(eps)))
    if not eps_list:
        raise ValueError("eps: give at least one radius")
    steps_list = _positive_ints(steps, "steps", allow_zero=True) if steps is not None else []
    alpha_value = None
    if alpha is not None:
        alpha_value = parse_eps(alpha)
        if alpha_value <= 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
    transform_names = _names(transforms, "transforms")
    if ensemble_factory is None:
        known = _known_transforms()
        if known is not None:
            bad = [t for t in transform_names if t != ORIGINAL and t not in known]
            if bad:
                raise ValueError(f"unknown transform(s) {bad}; expected {ORIGINAL!r} or one of "
                                 f"{list(known)}")
    members_list = _positive_ints(num_members, "num_members")
    ens_eps_list = []
    for e in _as_list(ensemble_eps):
        try:
            value = float(e)
        except (TypeError, ValueError):
            raise ValueError(f"ensemble_eps must be numbers, got {e!r}") from None
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"ensemble_eps must be finite and non-negative, got {e!r}")
        ens_eps_list.append(value)
    ens_eps_list = list(dict.fromkeys(ens_eps_list))
    if not members_list or not ens_eps_list:
        raise ValueError("num_members and ensemble_eps need at least one value each")
    if aggregate not in _AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; expected one of {list(_AGGREGATES)}")
    if attack_aggregate is None:
        attack_aggregate = aggregate if aggregate in ("mean", "logit_mean") else "mean"
    if attack_aggregate not in ("mean", "logit_mean"):
        raise ValueError(f"attack_aggregate must be 'mean' or 'logit_mean' (differentiable), got "
                         f"{attack_aggregate!r}")
    threats = _names(threat, "threat")
    for t in threats:
        get_threat(t)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(eot_iter, int) or eot_iter < 1:
        raise ValueError(f"eot_iter must be a positive integer, got {eot_iter!r}")
    strengths = _strengths(attacks, eps_list, steps_list, alpha_value)
    if steps_list and not any(get_attack(a).iterative for a in attacks):
        log.warning("steps=%s ignored: %s take no step count", steps_list, attacks)

    # ---- processes, model, data
    dist_info: DistInfo = init_distributed(device)
    dev = rank_device(device, dist_info)
    torch.manual_seed(_derive_seed(seed, "setup"))
    base_module, model_info = _load_model(model, dev)
    dataset = _load_data(data)
    test_labels = dataset.test.labels
    subset = stratified_subset(test_labels, n, seed)
    x_all, y_all = _split_tensors(dataset.test, subset)
    head = getattr(base_module, "head", None)
    num_classes = int(getattr(head, "num_classes", 0) or len(getattr(dataset, "classes", ())) or
                      int(test_labels.max()) + 1)

    # ---- targets: the base model, then one ensemble per (transform, G, ε)
    base = Target(ORIGINAL, base_module)
    ensemble_transforms = [t for t in transform_names if t != ORIGINAL]
    spm = samples_per_member or int(getattr(head, "hidden_features", 0) or 0) or None
    calibration_info: dict[str, Any] = {"split": "train", "count": 0}
    targets = [base]
    if ensemble_transforms:
        if spm is None:
            raise ValueError("samples_per_member is needed: the model has no head.hidden_features")
        need = max(members_list) * spm
        n_train = len(dataset.train.labels)
        if need > n_train:
            raise ValueError(f"the ensembles need {need} calibration images (num_members × "
                             f"samples_per_member) but the training split has {n_train}")
        gen = torch.Generator().manual_seed(_derive_seed(seed, "calibration") % (2**63))
        cal_index = torch.randperm(n_train, generator=gen)[:need]
        calibration, _ = _split_tensors(dataset.train, cal_index)
        calibration = calibration.to(dev)
        calibration_info = {"split": "train", "count": need, "samples_per_member": spm}
        factory = ensemble_factory or _default_ensemble_factory
        for transform in ensemble_transforms:
            for g in members_list:
                for e in ens_eps_list:
                    module = factory(base_module, calibration[: g * spm], transform=transform,
                                     num_members=g, eps=e, samples_per_member=spm, seed=seed,
                                     aggregate=aggregate, resample_on_forward=resample_members)
                    if isinstance(module, nn.Module):
                        module.to(dev).eval()
                    targets.append(Target(transform, module, g, e))

    # ---- slots: which (threat, target) pairs each strength measures
    def record_slots() -> list[tuple[str, Target]]:
        slots = [(WHITEBOX, base)]
        for t in targets[1:]:
            slots += [(th, t) for th in threats]
            if len(threats) > 1:
                slots.append((WORST, t))
        return slots

    units: list[tuple[str, Strength, list[tuple[str, Target]]]] = [
        ("record", s, record_slots()) for s in strengths]
    attacked = [s for s in strengths if not s.clean]
    probe_notes: list[str] = []
    if sanity and attacked:
        large = Strength("pgd", LARGE_EPS, LARGE_EPS_STEPS,
                         get_attack("pgd").resolve_alpha(LARGE_EPS, LARGE_EPS_STEPS, None))
        slots = [(WHITEBOX, base)]
        if "adaptive" in threats:
            slots += [("adaptive", t) for t in targets[1:]]
        if large not in strengths:
            units.append(("probe", large, slots))
            probe_notes.append(f"adaptive PGD-{LARGE_EPS_STEPS} at eps=64/255")
        if len(attacked) == len(strengths):  # no clean point: the checks need clean accuracy
            clean_probe = Strength(attacks[0], 0.0, get_attack(attacks[0]).resolve_steps(None))
            units.append(("probe", clean_probe, record_slots()))
            probe_notes.append("clean accuracy")
        if "fgsm" not in attacks:
            ref_eps = sorted({s.eps for s in attacked if s.attack != "fgsm"})
            for e in ref_eps:
                units.append(("probe", Strength("fgsm", e, 1, None), record_slots()))
            if ref_eps:
                probe_notes.append("single-step FGSM references at the grid's eps")

    # ---- run (sharded over ranks), then sum the counts
    batches = [(i, slice(start, min(start + batch_size, n)))
               for i, start in enumerate(range(0, n, batch_size))]
    my_batches = shard(batches, dist_info)
    runner = _Runner(base=base, targets=targets, threats=threats, seed=seed, eot_iter=eot_iter,
                     num_classes=num_classes, attack_aggregate=attack_aggregate)
    offsets, total_slots = [], 0
    for _, _, slots in units:
        offsets.append(total_slots)
        total_slots += len(slots)
    counts = torch.zeros(total_slots, dtype=torch.int64)
    unit_seconds = [0.0] * len(units)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(units) * len(my_batches), desc="attack grid", unit="batch",
               disable=not (progress and dist_info.is_main), dynamic_ncols=True)
    was_training = base_module.training
    base_module.eval()
    try:
        for u, (_role, strength, slots) in enumerate(units):
            bar.set_postfix_str(f"{strength.attack} eps={strength.eps:.4g} steps={strength.steps}")
            tick = time.perf_counter()
            for batch_index, rows in my_batches:
                x = x_all[rows].to(dev)
                y = y_all[rows].to(dev)
                got = runner.run_batch(strength, slots, x, y, batch_index)
                counts[offsets[u]: offsets[u] + len(slots)] += torch.tensor(got, dtype=torch.int64)
                bar.update(1)
            unit_seconds[u] = time.perf_counter() - tick
    finally:
        bar.close()
        base_module.train(was_training)
    counts = all_reduce_sum(counts, dist_info, dev)

    # ---- records, probes, warnings
    records: list[Record] = []
    probes: list[Record] = []
    for u, (role, strength, slots) in enumerate(units):
        for k, (threat_name, target) in enumerate(slots):
            correct = int(counts[offsets[u] + k])
            lo, hi = wilson_interval(correct, n)
            rec = Record(transform=target.transform, threat=threat_name, attack=strength.attack,
                         eps=strength.eps, steps=strength.steps, accuracy=correct / n,
                         ci_low=lo, ci_high=hi, n=n, correct=correct,
                         num_members=target.num_members, ensemble_eps=target.ensemble_eps,
                         alpha=strength.alpha)
            (records if role == "record" else probes).append(rec)
    warnings = sanity_checks(records, probes, num_classes=num_classes)
    for w in warnings:
        log.warning("%s", w)

    from .checkpoint import git_revision

    settings: dict[str, Any] = {
        **model_info,
        "data_source": str(getattr(dataset, "source", "in-memory")),
        "n": n,
        "subset": {"split": "test", "stratified": True, "seed": seed,
                   "class_counts": torch.bincount(y_all, minlength=num_classes).tolist()},
        "calibration": calibration_info,
        "attack": attacks,
        "eps": eps_list,
        "steps": steps_list or None,
        "alpha": alpha_value,
        "transforms": [ORIGINAL] + ensemble_transforms,
        "num_members": members_list,
        "ensemble_eps": ens_eps_list,
        "aggregate": aggregate,
        "attack_aggregate": attack_aggregate,
        "threat": threats,
        "seed": seed,
        "device": str(device),
        "batch_size": batch_size,
        "eot_iter": eot_iter,
        "resample_members": resample_members,
        "stochastic_targets": [t.key for t in targets if t.stochastic],
        "sanity_probes": probe_notes,
        "world_size": dist_info.world_size,
        "versions": _versions(),
        "git_revision": git_revision(),
        "started_at": started_at,
        "elapsed_s": round(time.perf_counter() - started, 3),
        "grid_seconds": {f"{role}:{s.key}": round(sec, 3)
                         for (role, s, _), sec in zip(units, unit_seconds, strict=True)},
    }
    return EvaluationResult(settings=settings, records=records, warnings=warnings, probes=probes)


def load_results(path: str | os.PathLike) -> EvaluationResult:
    """Read a ``results.json`` written by :func:`symensemble.report.write_results`."""
    import json

    payload = json.loads(Path(path).read_text())
    fields = Record.__dataclass_fields__
    make = lambda d: Record(**{k: v for k, v in d.items() if k in fields})  # noqa: E731
    return EvaluationResult(settings=payload.get("settings", {}),
                            records=[make(r) for r in payload.get("records", [])],
                            warnings=list(payload.get("warnings", [])),
                            probes=[make(r) for r in payload.get("probes", [])])



# --------------------------------------------------------------------------------------------
# Evaluation recipes (paper reproductions)
# --------------------------------------------------------------------------------------------

_RECIPE_KEYS = ("checkpoint", "data", "n", "attack", "eps", "steps", "alpha", "transforms",
                "num_members", "ensemble_eps", "aggregate", "attack_aggregate", "threat", "seed",
                "device", "batch_size", "eot_iter", "resample_members", "samples_per_member",
                "sanity")


@dataclass
class EvaluationRecipe:
    """A TOML evaluation recipe: ``[evaluate]`` settings plus the paper's numbers.

    Attributes:
        title: one line saying what is reproduced.
        settings: keyword arguments for :func:`evaluate` (``checkpoint`` becomes ``model``).
        paper: the ``[paper]`` table (reported numbers to compare with), possibly empty.
        path: the file it came from.
    """

    title: str
    settings: dict[str, Any]
    paper: dict[str, Any]
    path: Path


def resolve_recipe(path_or_name: str | os.PathLike) -> Path:
    """An existing TOML path, or a recipe name looked up in the repository's ``recipes/``.

    Raises:
        ValueError: nothing found; the message lists the available recipe names.
    """
    candidate = Path(path_or_name).expanduser()
    if candidate.is_file():
        return candidate
    folders = [Path(__file__).resolve().parent.parent / "recipes", Path.cwd() / "recipes"]
    name = candidate.name if candidate.suffix == ".toml" else f"{candidate.name}.toml"
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    known = sorted({p.stem for f in folders if f.is_dir() for p in f.glob("paper_*.toml")})
    raise ValueError(f"no recipe at {str(path_or_name)!r}; give a .toml path or one of {known}")


def load_evaluation_recipe(path_or_name: str | os.PathLike) -> EvaluationRecipe:
    """Read an evaluation recipe (see ``recipes/paper_fig11_fgsm.toml``).

    Raises:
        ValueError: missing file, bad TOML, no ``[evaluate]`` table or unknown keys in it.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    path = resolve_recipe(path_or_name)
    try:
        payload = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    table = payload.get("evaluate")
    if not isinstance(table, dict):
        raise ValueError(f"{path}: an evaluation recipe needs an [evaluate] table "
                         "(training recipes go to `symensemble train --recipe`)")
    unknown = sorted(set(table) - set(_RECIPE_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown [evaluate] keys {unknown}; "
                         f"allowed: {list(_RECIPE_KEYS)}")
    settings = dict(table)
    if "checkpoint" in settings:
        settings["model"] = settings.pop("checkpoint")
    paper = payload.get("paper", {})
    if not isinstance(paper, dict):
        raise ValueError(f"{path}: [paper] must be a table")
    return EvaluationRecipe(title=str(payload.get("title", path.stem)), settings=settings,
                            paper=paper, path=path)


class _CallableModule(types.ModuleType):
    """Lets ``symensemble.evaluate(...)`` call :func:`evaluate` in every import order.

    ``symensemble.evaluate`` names both this module and its main function. Importing the
    module (``from symensemble.evaluate import ...``, or any package module doing so) binds
    the package attribute ``symensemble.evaluate`` to the module, hiding the lazily exported
    function; calling the module forwards to the function, so ``se.evaluate(model, ...)``
    works either way.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> EvaluationResult:
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
