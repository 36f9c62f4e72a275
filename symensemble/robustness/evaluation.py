"""Robust accuracy of a model and its symmetry ensembles: :func:`evaluate`.

The pipeline reads like RobustBench's ``benchmark()``::

    config  = EvalConfig(...)                       # what to measure, validated once
    targets = build_targets(model, data, config)    # base model + one ensemble per (T, G, ε)
    units   = plan(config, targets)                 # typed units: strength × measures
    flags   = run(units, runner, images)            # per-image correctness, sharded by rank
    records = to_records(units, flags)              # sums; worst/robust rows are ANDs

The default protocol is the attack **portfolio** (:mod:`symensemble.robustness.attacks.portfolio`): at each
radius an image is robust only if it survives adaptive APGD-CE, APGD-DLR and APGD on a
soft-vote surrogate on each target's own output, PGD and FGSM transferred from the base
model, and optionally Square — a cascade in which each attack only tries the images every
earlier attack left robust. A defense is only as robust as the strongest attack behind it;
the paper's own protocol (FGSM crafted on the base model, App. I) overstates the ensembles'
robustness and remains available as ``protocol="paper"`` to reproduce its figures.

Accuracy is counted with the aggregate the user chose (``vote`` by default, the paper's
mode of member predictions), with a 95% Wilson interval. Sanity checks run on every
evaluation (:mod:`symensemble.robustness.sanity`) and come back as warnings.

    >>> import symensemble as se
    >>> result = se.evaluate("paper_cnn", n=500)
    >>> result.accuracy("group", eps=0.012)          # the portfolio's robust accuracy
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..distributed import DistInfo, current, rank_device
from ..runtime import eval_mode, git_revision, versions
from .binarization import binarization_checks
from .config import EvalConfig
from .plan import ROBUST, Kind, Role, Unit, plan
from .records import WHITEBOX, WORST, EvaluationResult, Record, wilson_interval
from .runner import Runner, run
from .sanity import sanity_checks
from .targets import load_targets, split_tensors, stratified_subset

__all__ = ["evaluate", "stratified_subset"]

log = logging.getLogger(__name__)


def evaluate(
    model: nn.Module | str | os.PathLike = "paper_cnn",
    data: Any = None,
    config: EvalConfig | None = None,
    *,
    progress: bool = False,
    ensemble_factory: Callable[..., nn.Module] | None = None,
    **options: Any,
) -> EvaluationResult:
    """Measure the robust accuracy of a model and its symmetry ensembles.

    Under ``torchrun``, inside :func:`symensemble.distributed.distributed` (the caller joins
    the process group), the batches are sharded across ranks and the per-image flags summed;
    the records equal the single-process ones (timings in the settings are this rank's). The
    caller's model gets its train/eval mode back and torch's global random state is restored.

    Args:
        model: a model (images in [0, 1] → logits) or a checkpoint path / shipped name.
        data: a CIFAR-10 source path, ``None`` ($SYMENSEMBLE_DATA or the cache), or a loaded
            dataset with ``.train`` and ``.test`` splits (``.images``, ``.labels``).
        config: an :class:`~symensemble.robustness.config.EvalConfig`; ``options`` override its
            fields (or build one: ``evaluate(model, n=500, eps=["8/255"])``).
        progress: show a tqdm bar over the plan (rank 0 only).
        ensemble_factory: ``fn(model, calibration, *, transform, num_members, eps,
            samples_per_member, seed, aggregate, calibration_noise, resample_on_forward)
            -> nn.Module``; defaults to :class:`symensemble.SymmetryEnsemble`.
        **options: :class:`EvalConfig` fields (the attacks' options included).

    Returns:
        An :class:`EvaluationResult` (records, probes, warnings, config, per-image flags).

    Raises:
        ValueError: a bad option (the message names it and what was expected).
        symensemble.checkpoint.CheckpointError, symensemble.data.DataError: bad model or data.
    """
    started, started_at = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        config = config.replace(**options) if config is not None else EvalConfig(**options)
    except TypeError as err:  # an unknown keyword
        raise ValueError(f"evaluate(): {err}") from None
    info = current()
    dev = rank_device(config.device, info)
    with _caller_state(model, dev):
        setup = load_targets(model, data, config, dev, ensemble_factory)
        x_all, y_all = split_tensors(setup.dataset.test, stratified_subset(
            setup.dataset.test.labels, config.n, config.seed))
        num_classes = _num_classes(setup.base, setup.dataset)
        units = plan(config, setup.targets)
        flags, seconds = run(units, Runner(setup.targets[0], config, num_classes), x_all, y_all,
                             info, dev, progress)
        records, probes, flag_map = _to_records(units, flags)
        binarized = binarization_checks(setup.targets, x_all.to(dev), flag_map, config)
    warnings = sanity_checks(records, probes, num_classes=num_classes, config=config) + binarized
    for w in warnings:
        log.warning("%s", w)
    context = _context(setup, config, units, seconds, y_all, num_classes, info)
    context.update(started_at=started_at, elapsed_s=round(time.perf_counter() - started, 3))
    settings = {**setup.model_info, **_config_settings(config), **context}
    return EvaluationResult(settings=settings, records=records, warnings=warnings, probes=probes,
                            config=config, flags=flag_map)


def _context(setup: Any, config: EvalConfig, units: list[Unit], seconds: list[float],
             y_all: torch.Tensor, num_classes: int, info: DistInfo) -> dict[str, Any]:
    """Provenance of a run for results.json: data, subset, calibration, versions, timings."""
    return {
        "data_source": str(getattr(setup.dataset, "source", "in-memory")),
        "subset": {"split": "test", "stratified": True, "seed": config.seed,
                   "class_counts": torch.bincount(y_all, minlength=num_classes).tolist()},
        "calibration": setup.calibration,
        "num_classes": num_classes,
        "stochastic_targets": [t.key for t in setup.targets if t.stochastic],
        "sanity_probes": [u.note for u in units if u.role is Role.PROBE and u.note],
        "world_size": info.world_size,
        "versions": versions(),
        "git_revision": git_revision(),
        "started_at": None,
        "elapsed_s": None,
        "grid_seconds": {u.key: round(sec, 3) for u, sec in zip(units, seconds, strict=True)},
    }


@contextlib.contextmanager
def _caller_state(model: Any, dev: torch.device) -> Iterator[None]:
    """Give the caller back its model's train/eval flags and torch's random state."""
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        if isinstance(model, nn.Module):
            with eval_mode(model):
                yield
        else:
            yield


def _num_classes(base: nn.Module, dataset: Any) -> int:
    head = getattr(base, "head", None)
    return int(getattr(head, "num_classes", 0) or len(getattr(dataset, "classes", ()))
               or int(dataset.test.labels.max()) + 1)


def _config_settings(config: EvalConfig) -> dict[str, Any]:
    """The config as results.json settings (``transforms`` always lists the base model first)."""
    out = config.to_dict()
    out["transforms"] = ["original", *config.ensemble_transforms]
    return out


def _record(unit: Unit, label: str, target, ok: torch.Tensor, broken: int | None = None) -> Record:
    n, correct = int(ok.numel()), int(ok.sum())
    lo, hi = wilson_interval(correct, n)
    s = unit.strength
    return Record(transform=target.transform, threat=label, attack=s.attack, eps=s.eps,
                  steps=s.steps, accuracy=correct / n, ci_low=lo, ci_high=hi, n=n,
                  correct=correct, num_members=target.num_members,
                  ensemble_eps=target.ensemble_eps, alpha=s.alpha, broken=broken)


def _unit_rows(unit: Unit, flags: torch.Tensor) -> list[tuple[Record, torch.Tensor]]:
    """A unit's records with their flags: measured rows, then the ANDs (worst / robust)."""
    rows: list[tuple[Record, torch.Tensor]] = []
    per_target: dict[str, list[int]] = {}
    for m, measure in enumerate(unit.measures):
        per_target.setdefault(measure.target.key, []).append(m)
    for members in per_target.values():
        target = unit.measures[members[0]].target
        if unit.kind is Kind.PORTFOLIO and unit.components:
            survived = flags[members[0]]  # the clean-correct images the cascade starts from
            rows.append((_record(unit, unit.measures[members[0]].label, target, survived),
                         survived))
            for m in members[1:]:
                before, survived = survived, survived & flags[m]
                broken = int((before & ~survived).sum())
                rows.append((_record(unit, unit.measures[m].label, target, flags[m], broken),
                             flags[m]))
            rows.append((_record(unit, ROBUST, target, survived), survived))
            continue
        for m in members:
            rows.append((_record(unit, unit.measures[m].label, target, flags[m]), flags[m]))
        threats = [m for m in members if unit.measures[m].label != WHITEBOX]
        if unit.kind is Kind.GRID and len(threats) > 1:
            worst = flags[threats].all(dim=0)
            rows.append((_record(unit, WORST, target, worst), worst))
    return rows


def _to_records(units: list[Unit], flags: list[torch.Tensor]
                ) -> tuple[list[Record], list[Record], dict[tuple, torch.Tensor]]:
    records: list[Record] = []
    probes: list[Record] = []
    flag_map: dict[tuple, torch.Tensor] = {}
    for unit, unit_flags in zip(units, flags, strict=True):
        for rec, ok in _unit_rows(unit, unit_flags):
            (records if unit.role is Role.RECORD else probes).append(rec)
            if unit.role is Role.RECORD:
                flag_map[rec.key] = ok
    return records, probes, flag_map
