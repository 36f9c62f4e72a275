"""Teleportation along the symmetry orbit of a trained head (``symensemble q teleport``).

The positive scaling g = diag(c) acts on a homogeneous (or linear) head by
V_k ↦ c_k V_k, b_k ↦ c_k b_k, U_{:,k} ↦ c_k^{−α} U_{:,k} (eq. 22): the network function, hence
every loss and accuracy, is unchanged, while the conserved quantities move,

    Q_k(c) = c_k² a_k − α c_k^{−2α} b_k,   a_k = |V_k|² + b_k²,  b_k = |U_{:,k}|²,

so any reachable per-unit or total Q can be hit exactly (:func:`unit_scales_for_q`). The loss
Hessian is not invariant: with H the Hessian in the head parameters, its diagonal blocks scale
as H_VV/c_k² and H_UU·c_k^{2α}, so the trace is

    Tr H(c) = Σ_k A_k/c_k² + B_k c_k^{2α} + const,

minimized in closed form at c_k^{2α+2} = A_k/(α B_k) (:func:`flattest_scales` with
``objective="trace"``). A_k and B_k are computed exactly for the cross-entropy loss on a batch of
features (:func:`hessian_trace_terms`); the top eigenvalue is found by Lanczos and minimized by
a pattern search in log c started from the trace optimum (``objective="top"``).

O(h) (radial heads) acts by isometries of parameter space, so Q and the whole Hessian spectrum
are constant on its orbits; sigmoid and tanh heads have no linear symmetry. Both are refused.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..io import default_run_dir
from ..plotting import new_figure, save_figure
from ..runtime import eval_mode
from ..symmetry.activations import Activation
from ..symmetry.conserved import homogeneous_q, orbit_scale_for_target, unit_q_terms
from ..symmetry.groups import HiddenGroup, group_kind_for_activation
from ..symmetry.linear import LinearSymmetry, stack_forward
from ..symmetry.module_bridge import load_stack_params, module_layers
from ..symmetry.stack import StackParams
from .common import run_header, sigma_derivatives, write_result
from .hessian import hvp_fn, lanczos
from .inspection import head_stack

__all__ = [
    "teleport_group",
    "unit_scales_for_q",
    "scale_params",
    "apply_unit_scales",
    "hessian_trace_terms",
    "head_hessian_trace",
    "head_top_eigenvalue",
    "reduce_features",
    "flattest_scales",
    "teleport",
    "TeleportRun",
    "training_features",
    "evaluate_before_after",
    "teleport_checkpoint",
    "plot_teleport",
]

log = logging.getLogger(__name__)


def teleport_group(model: nn.Module) -> tuple[StackParams, Activation, float]:
    """The head θ (float64), its activation and α, after checking teleportation applies.

    Raises:
        ValueError: no SymHead; an activation without a continuous linear symmetry; a radial
            head (O(h) preserves Q and the Hessian spectrum).
    """
    params, act = head_stack(model)
    kind, alpha = group_kind_for_activation(act)  # raises for sigmoid, tanh, ...
    if kind == "orthogonal":
        raise ValueError(
            f"the {act.name!r} head's symmetry group O(h) acts by isometries of parameter space: "
            "Tr(VV^T + bb^T - U^T U) and the Hessian spectrum are the same at every point of the "
            "orbit, so no target Q or flatter point can be reached"
        )
    return params, act, alpha


def unit_scales_for_q(
    params: StackParams,
    alpha: float = 1.0,
    *,
    total: float | None = None,
    per_unit: torch.Tensor | list[float] | None = None,
) -> torch.Tensor:
    """Scales c (h,) that move the head to the requested Q exactly.

    Args:
        params: head θ.
        alpha: homogeneity degree.
        total: target Σ_k Q_k, reached with one common scale c·I.
        per_unit: target Q_k for every unit (h values).

    Raises:
        ValueError: neither or both targets given, wrong length, or an unreachable target
            (the message names the unit and the reachable interval).
    """
    if (total is None) == (per_unit is None):
        raise ValueError("give exactly one of total=... or per_unit=...")
    a, b = unit_q_terms(params)
    if per_unit is not None:
        t = torch.as_tensor(per_unit, dtype=torch.float64)
        if t.shape != a.shape:
            raise ValueError(f"per_unit needs {a.numel()} targets (one per hidden unit), got {t.numel()}")
        return orbit_scale_for_target(a, b, t, alpha)
    c = orbit_scale_for_target(a.sum(), b.sum(), float(total), alpha)
    return c.expand_as(a).clone()


def scale_params(params: StackParams, c: torch.Tensor, alpha: float) -> StackParams:
    """diag(c)·θ for the head (eq. 22 with π(g) = g^α)."""
    sym = LinearSymmetry((HiddenGroup("scaling", c.numel(), alpha),))
    return sym.act((torch.diag(c.to(params.dtype)),), params)


def apply_unit_scales(model: nn.Module, c: torch.Tensor, *, inplace: bool = False) -> nn.Module:
    """The model with its head moved by g = diag(c) (a deep copy unless ``inplace``)."""
    params, act, alpha = teleport_group(model)
    if c.shape != (params.widths[1],) or not bool((c > 0).all()):
        raise ValueError(f"c must be {params.widths[1]} positive scales, got shape {tuple(c.shape)}")
    moved = scale_params(params, c.to(torch.float64), alpha)
    _check_finite(moved, c, _head_dtype(model))
    target = model if inplace else copy.deepcopy(model)
    load_stack_params(target, moved)
    return target


def _head_dtype(model: nn.Module) -> torch.dtype:
    return module_layers(model)[0][0].weight.dtype


def _check_scales(c: torch.Tensor, q_total: float) -> None:
    """Refuse scales that over- or underflowed float64 (a target far out along the orbit)."""
    if bool((torch.isfinite(c) & (c > 0)).all()):
        return
    raise ValueError(
        f"the move needs unit scales c outside the float64 range (got {c.tolist()}): the target "
        f"is too far along the orbit; choose a target Q closer to the current Q = {q_total:.6g}"
    )


def _check_finite(moved: StackParams, c: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse a move whose head weights would not be finite in the model's dtype."""
    if all(bool(torch.isfinite(t.to(dtype)).all()) for t in moved.tensors()):
        return
    raise ValueError(
        f"the move needs unit scales c from {float(c.min()):.3g} to {float(c.max()):.3g}, which make "
        f"the head's {str(dtype).removeprefix('torch.')} weights overflow (non-finite); choose a "
        "target Q closer to the current one"
    )


# ----------------------------------------------------------------------------------------------
# Flatness of the head
# ----------------------------------------------------------------------------------------------


def hessian_trace_terms(
    params: StackParams, act: Activation, features: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Exact per-unit diagonal-block traces of the mean cross-entropy Hessian of the head.

    With logits U σ(Z) + b_U, Z = X Vᵀ + b, p = softmax, H_i = diag(p_i) − p_i p_iᵀ:

    * A_k = Σ_j ∂²L/∂V_kj² + ∂²L/∂b_k² = mean_i (|x_i|² + 1)(σ′(z_ik)² U_kᵀH_iU_k
      + σ″(z_ik) (Uᵀ(p_i − y_i))_k);
    * B_k = Σ_r ∂²L/∂U_rk² = mean_i σ(z_ik)² Σ_r p_ir(1 − p_ir);
    * const = Σ_r ∂²L/∂b_{U,r}² = mean_i Σ_r p_ir(1 − p_ir).

    Shape:
        features (N, d), labels (N,) → A (h,), B (h,), const ().
    """
    V, b, U, bU = params.V, params.b_V, params.U, params.b_U
    X = features.to(params.dtype)
    Z = X @ V.T + (0 if b is None else b)
    S, d1, d2 = sigma_derivatives(act, Z)
    logits = S @ U.T + (0 if bU is None else bU)
    P = torch.softmax(logits, dim=1)
    Yh = F.one_hot(labels, P.shape[1]).to(P.dtype)
    quad = P @ U.square() - (P @ U).square()  # U_kᵀ H_i U_k, (N, h)
    x2 = X.square().sum(1, keepdim=True) + (0.0 if b is None else 1.0)
    A = (x2 * (d1.square() * quad + d2 * ((P - Yh) @ U))).mean(0)
    pdiag = (P * (1 - P)).sum(1, keepdim=True)
    B = (S.square() * pdiag).mean(0)
    const = pdiag.mean() if bU is not None else torch.zeros((), dtype=P.dtype)
    return {"A": A, "B": B, "const": const}


def head_hessian_trace(
    params: StackParams, act: Activation, features: torch.Tensor, labels: torch.Tensor
) -> float:
    """Tr ∇²L over all head parameters, exactly (:func:`hessian_trace_terms`)."""
    t = hessian_trace_terms(params, act, features, labels)
    return float(t["A"].sum() + t["B"].sum() + t["const"])


def _loss_flat(params: StackParams, act: Activation, X: torch.Tensor, y: torch.Tensor):
    def loss(flat: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(stack_forward(params.unflatten(flat), [act], X), y)

    return loss


def reduce_features(params: StackParams, features: torch.Tensor) -> tuple[StackParams, torch.Tensor]:
    """Rotate the head's input space onto the span of the N feature vectors (N < d).

    With Xᵀ = Q R (thin QR, Q ∈ R^{d×N}), the loss depends on V only through X Vᵀ =
    (XQ)(VQ)ᵀ, so the Hessian in the head parameters is Pᵀ H_r P for the orthonormal map
    P: V ↦ VQ, plus exact zeros: the nonzero spectrum (top eigenvalue, trace) is that of the
    small head with features XQ (N × N) and weights VQ (h × N). Returns (θ_r, XQ); unchanged when
    N ≥ d. Scaling a hidden unit commutes with the rotation.
    """
    X = features.to(params.dtype)
    N, d = X.shape
    if N >= d:
        return params, X
    Q, _ = torch.linalg.qr(X.T)  # (d, N)
    reduced = StackParams((params.V @ Q, params.U), params.biases)
    return reduced, X @ Q


def head_top_eigenvalue(
    params: StackParams,
    act: Activation,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    iters: int = 30,
    seed: int = 0,
) -> float:
    """Largest eigenvalue of the head-parameter Hessian of the mean cross-entropy (Lanczos)."""
    params, X = reduce_features(params, features)
    flat = params.flatten()
    mv = hvp_fn(_loss_flat(params, act, X, labels), flat)
    ritz = lanczos(mv, flat.numel(), iters, generator=torch.Generator().manual_seed(seed), dtype=params.dtype)
    return float(ritz[-1])


def flattest_scales(
    params: StackParams,
    act: Activation,
    alpha: float,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    objective: str = "trace",
    max_evals: int = 40,
    iters: int = 20,
    seed: int = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Scales c minimizing the Hessian trace (closed form) or top eigenvalue (pattern search).

    Returns:
        (c, info) with the objective before and after and the evaluations used.
    """
    if objective not in ("trace", "top"):
        raise ValueError(f"objective must be 'trace' or 'top', got {objective!r}")
    terms = hessian_trace_terms(params, act, features, labels)
    A, B = terms["A"], terms["B"]
    ok = (A > 0) & (B > 0)
    logc = torch.where(
        ok,
        torch.log(A.clamp_min(1e-300) / (alpha * B.clamp_min(1e-300))) / (2 * alpha + 2),
        torch.zeros_like(A),
    )
    info: dict[str, Any] = {
        "objective": objective,
        "trace_before": float(A.sum() + B.sum() + terms["const"]),
        "units_left_unscaled": int((~ok).sum()),
    }
    c = torch.exp(logc)
    info["trace_after"] = float((A / c.square() + B * c ** (2 * alpha)).sum() + terms["const"])
    if objective == "trace":
        return c, info

    small, X_small = reduce_features(params, features)

    def top(lc: torch.Tensor) -> float:
        return head_top_eigenvalue(
            scale_params(small, torch.exp(lc), alpha),
            act,
            X_small,
            labels,
            iters=iters,
            seed=seed,
        )

    info["top_before"] = top(torch.zeros_like(logc))
    best, f_best = logc.clone(), top(logc)
    info["top_at_trace_optimum"] = f_best
    if f_best > info["top_before"]:
        best, f_best = torch.zeros_like(logc), info["top_before"]
    best, f_best, evals = _pattern_search(top, best, f_best, max_evals, progress)
    c = torch.exp(best)
    info.update(
        {
            "top_after": f_best,
            "evaluations": evals,
            "trace_after": float((A / c.square() + B * c ** (2 * alpha)).sum() + terms["const"]),
        }
    )
    return c, info


def _pattern_search(
    f: Any, best: torch.Tensor, f_best: float, max_evals: int, progress: bool, evals: int = 2
) -> tuple[torch.Tensor, float, int]:
    """Coordinate pattern search minimizing ``f`` from ``best``: try ±step on each coordinate,
    move on the first improvement, halve the step when none improves; stops after ``max_evals``
    evaluations (``evals`` already spent) or below step 1e-3. Returns (best, f(best), evals)."""
    step = 0.5
    bar = tqdm(total=max_evals, desc="flattest (top eigenvalue)", disable=not progress)
    bar.update(evals)
    while evals < max_evals and step > 1e-3:
        improved = False
        for k in range(best.numel()):
            for sign in (1.0, -1.0):
                if evals >= max_evals:
                    break
                trial = best.clone()
                trial[k] += sign * step
                value = f(trial)
                evals += 1
                bar.update(1)
                if value < f_best:
                    best, f_best, improved = trial, value, True
                    break
        if not improved:
            step /= 2
    bar.close()
    return best, f_best, evals


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
        c, info = flattest_scales(
            params,
            act,
            alpha,
            features,
            labels,
            objective=flattest,
            max_evals=max_evals,
            iters=iters,
            seed=seed,
            progress=progress,
        )
        report["flatness"] = info
        report["mode"] = f"flattest-{flattest}"
    else:
        c = unit_scales_for_q(params, alpha, total=total, per_unit=per_unit)
        report["mode"] = "target-total" if total is not None else "target-per-unit"
    _check_scales(c, float(q_before.sum()))
    new = apply_unit_scales(model, c)
    new_params = head_stack(new)[0]
    q_after = homogeneous_q(new_params, alpha)[0]
    report.update(
        {
            "scales": c.tolist(),
            "Q_before": q_before.tolist(),
            "Q_after": q_after.tolist(),
            "Q_total_before": float(q_before.sum()),
            "Q_total_after": float(q_after.sum()),
        }
    )
    if total is not None:
        report["target"] = float(total)
        report["target_abs_error"] = abs(float(q_after.sum()) - float(total))
    if per_unit is not None:
        report["target"] = list(per_unit)
        report["target_abs_error"] = float(
            (q_after - torch.as_tensor(per_unit, dtype=torch.float64)).abs().max()
        )
    if features is not None and labels is not None:
        report["hessian_trace_before"] = head_hessian_trace(params, act, features, labels)
        report["hessian_trace_after"] = head_hessian_trace(new_params, act, features, labels)
    log.info(
        "teleport %s: Q total %.6g -> %.6g",
        report["mode"],
        report["Q_total_before"],
        report["Q_total_after"],
    )
    return new, report


# ----------------------------------------------------------------------------------------------
# A checkpoint in, a teleported checkpoint out (``symensemble q teleport``)
# ----------------------------------------------------------------------------------------------


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
    from ..training.loop import evaluate_split

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
    from ..checkpoint import save_checkpoint

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
    from ..checkpoint import load_model

    _check_request(total, per_unit, flattest, None if out is None else Path(out))
    model, info = load_model(checkpoint, with_info=True)
    params, _, _ = teleport_group(model)
    if per_unit is not None and len(per_unit) != params.widths[1]:
        raise ValueError(f"the head has {params.widths[1]} hidden units, got {len(per_unit)} targets")
    dataset = None
    if evaluate or flattest is not None:
        from ..data import load_cifar10

        dataset = load_cifar10(data, val_size=0)  # train + test only
    features = labels = None
    if flattest is not None:
        features, labels = _sample_features(model, dataset.train, samples, seed)
    new, report = teleport(model, total=total, per_unit=None if per_unit is None else list(per_unit),
                           flattest=flattest, features=features, labels=labels, max_evals=max_evals,
                           iters=lanczos_iters, seed=seed, progress=progress)
    report["source_checkpoint"] = info["path"]
    if evaluate:
        report["evaluation"] = evaluate_before_after(model, new, dataset.test, tol)
    if out is None:
        stem = Path(info["path"]).name.removesuffix(".safetensors") or "model"
        out = default_run_dir("q-teleport") / f"{stem}-{report['mode']}.safetensors"
    out = Path(out)
    _save_teleported(new, out, info, report)
    settings = dict(checkpoint=str(checkpoint), target=total, unit_targets=per_unit, flattest=flattest,
                    samples=samples, max_evals=max_evals, lanczos_iters=lanczos_iters, tol=tol, seed=seed,
                    eval=evaluate)
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
