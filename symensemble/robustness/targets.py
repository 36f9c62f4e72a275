"""What an evaluation attacks: the base model, its symmetry ensembles, and their data.

:func:`build_ensemble` is the one public way to build, from Python, exactly the ensemble that
``symensemble attack`` evaluates — same calibration images (a seeded draw from the training
split), same member seed — so Python and CLI numbers agree::

    >>> import symensemble as se
    >>> ens = se.build_ensemble("paper_cnn", transform="group", num_members=200, eps=10.0)

:func:`build_targets` builds every target of an :class:`~symensemble.robustness.config.EvalConfig`
the same way, and :func:`stratified_subset` draws the evaluated test images.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from .config import EvalConfig
from .records import ORIGINAL, Target, transform_choices
from .runner import derive_seed

__all__ = ["build_ensemble", "build_targets", "load_targets", "Setup", "stratified_subset",
           "calibration_images", "load_target_model", "load_dataset", "split_tensors"]

EnsembleFactory = Callable[..., nn.Module]


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of a seeded random subset of size ``n`` with class proportions preserved.

    Each class gets ``floor(n · share)`` images, the remainder going to the classes with the
    largest fractional quotas; the result is shuffled so batches mix classes. Works when the
    split is ordered by class, as CIFAR-10 class-folder trees are.

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


def split_tensors(split: Any, index: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(float images in [0, 1], int64 labels) of a split, optionally indexed."""
    images, labels = split.images, split.labels
    if index is not None:
        images, labels = images[index], labels[index]
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    return images.float(), labels.long()


def load_target_model(model: nn.Module | str | os.PathLike, device: torch.device
                      ) -> tuple[nn.Module, dict[str, Any]]:
    """(model on ``device`` in eval mode, provenance of where it came from)."""
    if isinstance(model, nn.Module):
        info = {"checkpoint": None,
                "model_name": getattr(model, "model_name", type(model).__name__),
                "model_args": getattr(model, "model_args", {})}
        return model.to(device).eval(), info
    from ..checkpoint import load_model

    loaded, meta = load_model(model, device=device, with_info=True)
    info = {"checkpoint": meta["path"], "model_name": meta["model_name"],
            "model_args": meta["model_args"], "checkpoint_git_revision": meta.get("git_revision"),
            "checkpoint_metrics": meta.get("metrics")}
    return loaded, info


def load_dataset(data: Any) -> Any:
    """A CIFAR-10 dataset from a path / ``None`` (no validation hold-out), or ``data`` itself.

    Raises:
        ValueError: ``data`` is neither a path nor an object with ``.train`` and ``.test``.
    """
    if data is None or isinstance(data, (str, os.PathLike)):
        from ..data import load_cifar10

        # no validation hold-out: evaluation draws test images and training-split calibration
        return load_cifar10(data, val_size=0)
    for attr in ("train", "test"):
        if not hasattr(data, attr):
            raise ValueError(
                f"data must be a path, None (use $SYMENSEMBLE_DATA) or a dataset with .train and "
                f".test splits, got {type(data).__name__} without .{attr}"
            )
    return data


def calibration_images(dataset: Any, count: int, seed: int, device: torch.device | str = "cpu"
                       ) -> torch.Tensor:
    """The first ``count`` images of the evaluation's seeded draw from the training split.

    Every ensemble of size G takes the first ``G · samples_per_member`` of them, so a sweep
    over G nests its calibration sets and one ensemble built alone matches the sweep's. When
    ``count`` exceeds the training split (e.g. h = 128, s = 2h, G = 200 asks for 51,200), the
    draw continues cyclically through the same permutation: members then share images, but any
    run of at most N consecutive images — one member's own s ≤ N images — stays distinct.
    """
    n_train = len(dataset.train.labels)
    gen = torch.Generator().manual_seed(derive_seed(seed, "calibration") % (2**63))
    perm = torch.randperm(n_train, generator=gen)
    index = perm[torch.arange(count) % n_train]
    return split_tensors(dataset.train, index)[0].to(device)


def _has_symhead(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "head", None), "hidden_features", 0))


def _default_factory(model: nn.Module, calibration: torch.Tensor, **kw: Any) -> nn.Module:
    """A :class:`SymmetryEnsemble`; for a model without a ``SymHead`` (any classifier ending
    in Z → σ → pooling → Linear) the one :meth:`SymmetryEnsemble.from_model` locates."""
    from ..ensembles.ensemble import SymmetryEnsemble

    if _has_symhead(model):
        return SymmetryEnsemble(model, calibration, **kw)
    return SymmetryEnsemble.from_model(model, calibration, **kw)


def _head_width(base: nn.Module, dataset: Any) -> int:
    """h of a SymHead, else the channel count C that :func:`locate_head` finds (0: unknown)."""
    if _has_symhead(base):
        return int(base.head.hidden_features)
    from ..ensembles.locate import locate_head

    try:
        example = split_tensors(dataset.train, torch.arange(min(8, len(dataset.train.labels))))[0]
        return int(locate_head(base, example.to(next(base.parameters()).device)).channels)
    except (ValueError, RuntimeError, StopIteration):
        return 0


def _samples_per_member(base: nn.Module, config: EvalConfig, dataset: Any) -> int:
    """``config.samples_per_member``, else the ensemble default (2h, or 2C for a located head);
    at most the training split."""
    from ..ensembles.ensemble import default_samples_per_member

    n_train = len(dataset.train.labels)
    hidden = 0 if config.samples_per_member is not None else _head_width(base, dataset)
    if config.samples_per_member is None and not hidden:
        raise ValueError("samples_per_member is needed: the model has no head.hidden_features "
                         "and no head Z → σ → pooling → Linear could be located")
    spm = config.samples_per_member or default_samples_per_member(hidden)
    if spm > n_train:
        raise ValueError(f"samples_per_member={spm} calibration images per member, but the "
                         f"training split has only {n_train}; pass a smaller samples_per_member")
    return spm


def _check_memory(base: nn.Module, config: EvalConfig, spm: int, dataset: Any) -> None:
    """Refuse, before drawing anything, an ensemble that cannot fit (one estimator: runtime)."""
    from ..runtime import ensemble_memory, require_memory

    hidden = int(getattr(getattr(base, "head", None), "hidden_features", 0) or spm // 2 or 1)
    classes = len(getattr(dataset, "classes", ()) or ()) or 10
    g = max(config.num_members)
    need = ensemble_memory(g, spm, hidden, classes, image_bytes=4 * 3 * 32 * 32)["total"]
    require_memory(need, f"an ensemble of {g} members with {spm} calibration images each",
                   "pass a smaller num_members or samples_per_member")


def build_targets(base: nn.Module, dataset: Any, config: EvalConfig, device: torch.device,
                  factory: EnsembleFactory | None = None) -> tuple[list[Target], dict[str, Any]]:
    """The base model, then one ensemble per (transform, G, ε) of ``config``, in that order.

    Returns:
        (targets, calibration info for the results).

    Raises:
        ValueError: unknown transform (with the default factory), no head width to size the
            calibration batches, or too few training images.
    """
    if factory is None:
        known = transform_choices()
        bad = [t for t in config.transforms if t not in known]
        if bad:
            raise ValueError(f"unknown transform(s) {bad}; expected {ORIGINAL!r} or one of "
                             f"{known[1:]}")
    targets = [Target(ORIGINAL, base)]
    if not config.ensemble_transforms:
        return targets, {"split": "train", "count": 0}
    spm = _samples_per_member(base, config, dataset)
    _check_memory(base, config, spm, dataset)
    need = max(config.num_members) * spm
    calibration = calibration_images(dataset, need, config.seed, device)
    make = factory or _default_factory
    for transform in config.ensemble_transforms:
        for g in config.num_members:
            for e in config.ensemble_eps:
                module = make(base, calibration[: g * spm], transform=transform, num_members=g,
                              eps=e, samples_per_member=spm, seed=config.seed,
                              aggregate=config.aggregate, calibration_noise=config.calibration_noise,
                              resample_on_forward=config.resample_members)
                if isinstance(module, nn.Module):
                    module.to(device).eval()
                targets.append(Target(transform, module, g, e))
    return targets, {"split": "train", "count": need, "samples_per_member": spm,
                     "calibration_noise": config.calibration_noise}


class Setup(NamedTuple):
    """What an evaluation attacks: the base model, where it came from, the data, the targets."""

    base: nn.Module
    model_info: dict[str, Any]
    dataset: Any
    targets: list[Target]
    calibration: dict[str, Any]


def load_targets(model: nn.Module | str | os.PathLike, data: Any, config: EvalConfig,
                 device: torch.device, factory: EnsembleFactory | None = None) -> Setup:
    """Load the model and data and build every target, seeded as every evaluation is.

    The one place that seeds the setup, so :func:`build_ensemble` and
    :func:`symensemble.evaluate` build the same ensembles. Reseeds torch's global RNG: run it
    inside ``torch.random.fork_rng`` to give the caller its state back.
    """
    torch.manual_seed(derive_seed(config.seed, "setup"))
    base, model_info = load_target_model(model, device)
    dataset = load_dataset(data)
    targets, calibration = build_targets(base, dataset, config, device, factory)
    return Setup(base, model_info, dataset, targets, calibration)


def build_ensemble(model: nn.Module | str | os.PathLike = "paper_cnn", data: Any = None, *,
                   transform: str = "group", num_members: int = 200, eps: float = 10.0,
                   samples_per_member: int | None = None, calibration_noise: float = 0.0,
                   aggregate: str = "vote",
                   resample_members: bool = False, seed: int = 0,
                   device: str | torch.device = "cpu") -> nn.Module:
    """The symmetry ensemble ``symensemble attack`` evaluates for these settings.

    Same calibration draw (:func:`calibration_images` with ``seed``) and member seed as
    :func:`symensemble.evaluate` with ``seed``, so accuracies computed on it in Python equal
    the CLI's.

    Args:
        model: a model or a checkpoint path / shipped name.
        data: CIFAR-10 source (path, ``None`` for $SYMENSEMBLE_DATA, or a loaded dataset).
        transform, num_members, eps, samples_per_member, calibration_noise, aggregate,
        resample_members:
            as :class:`symensemble.SymmetryEnsemble` (``eps`` is the ensemble radius ε).
        seed: the evaluation seed (``--seed``).
        device: torch device.
    """
    config = EvalConfig(transforms=(ORIGINAL, transform), num_members=num_members,
                        ensemble_eps=eps, samples_per_member=samples_per_member,
                        calibration_noise=calibration_noise,
                        aggregate=aggregate, resample_members=resample_members, seed=seed,
                        device=str(device))
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        return load_targets(model, data, config, dev).targets[1].module
