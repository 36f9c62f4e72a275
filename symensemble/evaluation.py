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

The pieces live in their own modules: :mod:`symensemble.records` (constants, records, the
result), :mod:`symensemble.threats` (threat models) and :mod:`symensemble.sanity` (checks).
This module holds the subset draw, the runner, :func:`evaluate` and the evaluation recipes.

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
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .attacks import DEFAULT_EOT_ITER, AttackPreset, get_attack
from .distributed import DistInfo, all_reduce_sum, init_distributed, rank_device, shard
from .ensemble import AGGREGATES
from .records import (
    DEFAULT_TRANSFORMS,
    ORIGINAL,
    PAPER_FGSM_EPS,
    THREATS,
    WHITEBOX,
    WORST,
    EvaluationResult,
    Record,
    Strength,
    Target,
    parse_eps,
    transform_choices,
    wilson_interval,
)
from .sanity import LARGE_EPS, LARGE_EPS_STEPS, sanity_checks
from .threats import get_threat

__all__ = [
    "evaluate",
    "EvaluationRecipe",
    "load_evaluation_recipe",
    "resolve_recipe",
    "stratified_subset",
]

log = logging.getLogger(__name__)

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

    def __init__(self, *, base: Target, seed: int, eot_iter: int, num_classes: int,
                 attack_aggregate: str) -> None:
        self.base = base
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
    summed; the records equal the single-process ones.

    The caller's state is left as it was: a model passed as a module gets its train/eval mode
    back, and torch's global random state (CPU and the evaluation's CUDA device) is restored
    after the run, although the run reseeds it per batch.

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
        ensemble_eps: ensemble radii ε: members use g = exp(ε·T), T with i.i.d. N(0, 1/h)
            entries, as in the paper's notebook (its text writes g = I + εM); ``perm_interp``
            has its own formula. A list sweeps them.
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
        An :class:`EvaluationResult`. Its records, probes and warnings are identical on every
        rank; the timings in its settings (``elapsed_s``, ``grid_seconds``) are each rank's
        own (rank 0's are the ones written by the CLI).

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
        known = transform_choices()
        bad = [t for t in transform_names if t not in known]
        if bad:
            raise ValueError(f"unknown transform(s) {bad}; expected {ORIGINAL!r} or one of "
                             f"{known[1:]}")
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
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; expected one of {list(AGGREGATES)}")
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
    # The caller's model and random state are left as they were: the run puts the model in
    # eval mode and reseeds torch per batch (torchattacks' APGD and AutoAttack reseed it too).
    was_training = model.training if isinstance(model, nn.Module) else None
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
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
            runner = _Runner(base=base, seed=seed, eot_iter=eot_iter, num_classes=num_classes,
                             attack_aggregate=attack_aggregate)
            offsets, total_slots = [], 0
            for _, _, slots in units:
                offsets.append(total_slots)
                total_slots += len(slots)
            counts = torch.zeros(total_slots, dtype=torch.int64)
            unit_seconds = [0.0] * len(units)

            from tqdm.auto import tqdm

            bar = tqdm(total=len(units) * len(my_batches), desc="attack grid", unit="batch",
                       disable=not (progress and dist_info.is_main), dynamic_ncols=True)
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
    finally:
        if was_training is not None:
            model.train(was_training)


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
