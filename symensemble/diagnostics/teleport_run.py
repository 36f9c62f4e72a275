"""Teleportation of a model's head, and of a checkpoint into a new one (``symensemble q teleport``).

:func:`teleport` moves a head along its scaling orbit (:mod:`.teleport`) to a chosen Q or to
the flattest point found (:mod:`.curvature`); :func:`teleport_checkpoint` does so from a
checkpoint file and writes the new checkpoint, a JSON report and a figure, after checking on
the test split that the network function is unchanged.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_model, save_checkpoint
from ..data import load_cifar10
from ..io import default_run_dir
from ..plotting import new_figure, save_figure
from ..runtime import eval_mode
from ..symmetry.conserved import homogeneous_q
from ..training.metrics import evaluate_split
from .common import run_header, write_result
from .curvature import flattest_scales, head_hessian_trace
from .inspection import head_stack
from .teleport import apply_unit_scales, check_scales, teleport_group, unit_scales_for_q

__all__ = [
    "teleport",
    "TeleportRun",
    "training_features",
    "evaluate_before_after",
    "teleport_checkpoint",
    "plot_teleport",
]

log = logging.getLogger(__name__)


def teleport(
    model: nn.Module,
    *,
    total: float | None = None,
    per_unit: list[float] | None = None,
    flattest: str | None = None,
    features: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    max_evals: int = 40,
    iters: int = 20,
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Move a model's head along its orbit to a chosen Q or to the flattest point found.

    Exactly one of ``total``, ``per_unit`` and ``flattest`` (``"trace"`` or ``"top"``, which
    need ``features`` (N, d) of training images and their ``labels``).

    Returns:
        (a transformed deep copy, report) — the report has the scales c, Q per unit before
        and after (recomputed from the stored weights), the reached-target error and, with
        features, the Hessian trace (and top eigenvalue) before and after.
    """
    if sum(x is not None for x in (total, per_unit, flattest)) != 1:
        raise ValueError("give exactly one of a total target Q, per-unit targets, or flattest=trace|top")
    params, act, alpha = teleport_group(model)
    q_before = homogeneous_q(params, alpha)[0]
    report: dict[str, Any] = {"alpha": alpha, "activation": act.config()}
    if flattest is not None:
        if features is None or labels is None:
            raise ValueError("flattest teleportation needs features and labels of training data")
        c, report["flatness"] = flattest_scales(params, act, alpha, features, labels, objective=flattest,
                                                max_evals=max_evals, iters=iters, seed=seed,
                                                progress=progress)
        report["mode"] = f"flattest-{flattest}"
    else:
        c = unit_scales_for_q(params, alpha, total=total, per_unit=per_unit)
        report["mode"] = "target-total" if total is not None else "target-per-unit"
    check_scales(c, float(q_before.sum()))
    new = apply_unit_scales(model, c)
    new_params = head_stack(new)[0]
    q_after = homogeneous_q(new_params, alpha)[0]
    report.update({"scales": c.tolist(), "Q_before": q_before.tolist(), "Q_after": q_after.tolist(),
                   "Q_total_before": float(q_before.sum()), "Q_total_after": float(q_after.sum())})
    report.update(_target_error(q_after, total, per_unit))
    if features is not None and labels is not None:
        report["hessian_trace_before"] = head_hessian_trace(params, act, features, labels)
        report["hessian_trace_after"] = head_hessian_trace(new_params, act, features, labels)
    log.info("teleport %s: Q total %.6g -> %.6g", report["mode"], report["Q_total_before"],
             report["Q_total_after"])
    return new, report


def _target_error(q_after: torch.Tensor, total: float | None, per_unit: list[float] | None) -> dict[str, Any]:
    """The requested target and how far the stored weights' Q is from it ({} for a flattest move)."""
    if total is not None:
        return {"target": float(total), "target_abs_error": abs(float(q_after.sum()) - float(total))}
    if per_unit is not None:
        err = (q_after - torch.as_tensor(per_unit, dtype=torch.float64)).abs().max()
        return {"target": list(per_unit), "target_abs_error": float(err)}
    return {}


@dataclass
class TeleportRun:
    """What :func:`teleport_checkpoint` wrote.

    Attributes:
        report: the teleport report (:func:`teleport`) with ``evaluation`` when measured.
        checkpoint, json_path, png_path: the files written.
    """

    report: dict[str, Any]
    checkpoint: Path
    json_path: Path
    png_path: Path

    @property
    def function_unchanged(self) -> bool:
        """False when the measured test loss/accuracy moved by more than the tolerance."""
        return bool(self.report.get("evaluation", {}).get("equal", True))


def _check_request(total: float | None, per_unit: Sequence[float] | None, flattest: str | None,
                   out: Path | None) -> None:
    if sum(x is not None for x in (total, per_unit, flattest)) != 1:
        raise ValueError("give exactly one of a total target Q, per-unit targets, or flattest=trace|top")
    if total is not None and not math.isfinite(total):
        raise ValueError(f"the target Q must be finite, got {total}")
    if per_unit is not None and not all(math.isfinite(v) for v in per_unit):
        raise ValueError(f"the per-unit targets must be finite, got {list(per_unit)}")
    if out is not None and Path(out).suffix != ".safetensors":
        raise ValueError(f"the new checkpoint must end in .safetensors, got {str(out)!r}")


@torch.no_grad()
def training_features(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Features entering the head, float64, for uint8 images (N, 3, H, W), model in eval mode."""
    with eval_mode(model):
        feats = [
            model.embed(images[i : i + batch_size].float().div(255)).double()
            for i in range(0, len(images), batch_size)
        ]
    return torch.cat(feats)


def _sample_features(
    model: nn.Module, train: Any, samples: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of ``samples`` training images drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train), generator=gen)[:samples].sort().values
    subset = train.subset(idx)
    return training_features(model, subset.images), subset.labels


def evaluate_before_after(
    before_model: nn.Module, after_model: nn.Module, split: Any, tol: float
) -> dict[str, Any]:
    """Test loss and accuracy of both models and whether they agree to relative ``tol``."""
    before = evaluate_split(before_model, split)
    after = evaluate_split(after_model, split)
    rel_loss = abs(after["loss"] - before["loss"]) / max(abs(before["loss"]), 1e-12)
    rel_acc = abs(after["accuracy"] - before["accuracy"]) / max(abs(before["accuracy"]), 1e-12)
    return {
        "split": "test",
        "before": before,
        "after": after,
        "rel_loss_change": rel_loss,
        "rel_accuracy_change": rel_acc,
        "tol": tol,
        "equal": rel_loss <= tol and rel_acc <= tol,
    }


def _save_teleported(new: nn.Module, out: Path, info: dict[str, Any], report: dict[str, Any]) -> None:
    """The new checkpoint with the source's metadata, updated metrics and a ``teleport`` note."""
    metrics = dict(info.get("metrics") or {})
    if "evaluation" in report:
        after = report["evaluation"]["after"]
        metrics.update({"test_loss": after["loss"], "test_accuracy": after["accuracy"]})
    summary = {k: report[k] for k in ("mode", "Q_total_before", "Q_total_after", "scales")}
    summary.update({"source_checkpoint": info["path"], "target": report.get("target")})
    save_checkpoint(
        new,
        out,
        recipe=info.get("recipe"),
        epoch=info.get("epoch"),
        metrics=metrics,
        data_source=info.get("data_source"),
        # The source's optimizer tensors are not carried over (its moments belong to the old
        # parameters anyway), so drop its optimizer metadata and mark the run as finished:
        # `symensemble train --resume` must not continue from this file with fresh moments.
        extra={
            **{k: v for k, v in (info.get("extra") or {}).items() if k != "optimizer"},
            "complete": True,
            "teleport": summary,
        },
    )


def teleport_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    total: float | None = None,
    per_unit: Sequence[float] | None = None,
    flattest: str | None = None,
    data: str | os.PathLike | None = None,
    evaluate: bool = True,
    samples: int = 512,
    max_evals: int = 40,
    lanczos_iters: int = 20,
    tol: float = 1e-5,
    seed: int = 0,
    progress: bool = False,
) -> TeleportRun:
    """Teleport a checkpoint's head (:func:`teleport`) and write the new checkpoint, a JSON
    report and a figure (``<out stem>.json``/``.png``).

    Args:
        checkpoint: a ``.safetensors`` file or a shipped name (``paper_cnn``).
        out: the new ``.safetensors`` file [default: ``runs/q-teleport-<timestamp>/<name>-<mode>``].
        total, per_unit, flattest: the move, exactly one (see :func:`teleport`).
        data: CIFAR-10 source, needed by ``flattest`` and ``evaluate``.
        evaluate: measure test loss and accuracy before and after.
        samples: training images whose features define the Hessian for ``flattest``.
        max_evals, lanczos_iters: budget of the ``flattest="top"`` search.
        tol: largest relative change of test loss/accuracy counted as "unchanged".
        seed: seed of the training-image sample and of Lanczos.

    Raises:
        CheckpointError: the checkpoint cannot be read. DataError: the data cannot be loaded.
        ValueError: a bad request, a head without a usable orbit, or a move whose result is not
            finite — all before anything is written.
    """
    _check_request(total, per_unit, flattest, None if out is None else Path(out))
    model, info = load_model(checkpoint, with_info=True)
    params, _, _ = teleport_group(model)
    if per_unit is not None and len(per_unit) != params.widths[1]:
        raise ValueError(f"the head has {params.widths[1]} hidden units, got {len(per_unit)} targets")
    dataset = load_cifar10(data, val_size=0) if evaluate or flattest is not None else None  # train + test
    features = labels = None
    if flattest is not None:
        features, labels = _sample_features(model, dataset.train, samples, seed)
    new, report = teleport(model, total=total, per_unit=None if per_unit is None else list(per_unit),
                           flattest=flattest, features=features, labels=labels, max_evals=max_evals,
                           iters=lanczos_iters, seed=seed, progress=progress)
    report["source_checkpoint"] = info["path"]
    if evaluate:
        report["evaluation"] = evaluate_before_after(model, new, dataset.test, tol)
    settings = dict(checkpoint=str(checkpoint), target=total, unit_targets=per_unit, flattest=flattest,
                    samples=samples, max_evals=max_evals, lanczos_iters=lanczos_iters, tol=tol, seed=seed,
                    eval=evaluate)
    return _write_run(new, out, info, report, settings)


def _write_run(new: nn.Module, out: str | os.PathLike | None, info: dict[str, Any], report: dict[str, Any],
               settings: dict[str, Any]) -> TeleportRun:
    """The new checkpoint (default ``runs/q-teleport-<timestamp>/<stem>-<mode>``), its JSON and figure."""
    if out is None:
        stem = Path(info["path"]).name.removesuffix(".safetensors") or "model"
        out = default_run_dir("q-teleport") / f"{stem}-{report['mode']}.safetensors"
    out = Path(out)
    _save_teleported(new, out, info, report)
    header = {**run_header("symensemble q teleport", settings), "checkpoint": str(out)}
    json_path, png_path = write_result(out.with_suffix(".json"), header, report, plot_teleport)
    return TeleportRun(report, out, json_path, png_path)


def plot_teleport(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Q_k before and after per hidden unit, and the scales c_k (log axis)."""
    h = len(report["Q_before"])
    k = list(range(h))
    fig, axes = new_figure(1, 2, figsize=(max(7.0, 0.5 * h + 3), 3.2))
    axes[0].bar([i - 0.2 for i in k], report["Q_before"], width=0.4, label="before")
    axes[0].bar([i + 0.2 for i in k], report["Q_after"], width=0.4, label="after")
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set_xlabel("hidden unit k")
    axes[0].set_ylabel(r"$Q_k$")
    axes[0].legend(fontsize=7)
    axes[0].set_title(
        f"{report['mode']}: Q {report['Q_total_before']:.4g} -> {report['Q_total_after']:.4g}",
        fontsize=9,
    )
    axes[1].bar(k, report["scales"])
    axes[1].set_yscale("log")
    axes[1].set_xlabel("hidden unit k")
    axes[1].set_ylabel("scale $c_k$")
    ev = report.get("evaluation")
    if ev:
        axes[1].set_title(
            f"test loss {ev['before']['loss']:.5f} -> {ev['after']['loss']:.5f}, "
            f"acc {ev['before']['accuracy']:.4f} -> {ev['after']['accuracy']:.4f}",
            fontsize=8,
        )
    fig.tight_layout()
    save_figure(fig, path)
