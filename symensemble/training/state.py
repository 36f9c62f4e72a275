"""Run state on disk: the checkpoint and log written after every epoch, and ``--resume``.

The optimizer state is flattened into safetensors tensors plus a JSON remainder
(:func:`optimizer_to_tensors`), so a checkpoint never needs unpickling; :func:`restore`
loads weights, optimizer state and history of an interrupted run after checking that it is the
same run (recipe and data source) and that it is unfinished.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, read_checkpoint, save_checkpoint, split_train_state
from ..distributed import DistInfo, barrier
from ..io import atomic_write_text
from ..models import SymModel
from .metrics import format_metrics
from .recipe import Recipe, RecipeError

__all__ = ["log_path_for", "best_path_for", "default_out", "optimizer_to_tensors", "optimizer_from_tensors",
           "write_epoch", "keep_robust_best", "restore"]

log = logging.getLogger(__name__)


def log_path_for(checkpoint: Path) -> Path:
    """The per-epoch JSON log written beside a checkpoint: ``<stem>.log.json``."""
    return checkpoint.with_name(checkpoint.stem + ".log.json")


def best_path_for(checkpoint: Path) -> Path:
    """The best-by-robust-validation checkpoint of an adversarial run: ``<stem>.best.safetensors``."""
    return checkpoint.with_name(checkpoint.stem + ".best.safetensors")


def default_out(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.model}-{recipe.act}-h{recipe.hidden}-seed{recipe.seed}.safetensors"


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer state dict into tensors (safetensors) and a JSON-able remainder."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def write_epoch(model: SymModel, opt: torch.optim.Optimizer, out: Path, log_path: Path, recipe: Recipe,
                 metrics: dict[str, Any], data_source: str, log_record: dict[str, Any],
                 final: bool = False) -> None:
    """Checkpoint (with optimizer state unless it is the last epoch) and log of a finished epoch;
    ``final``: the run stops here early (a collapse), so the checkpoint is complete."""
    last = final or metrics["epoch"] == recipe.epochs
    opt_tensors, opt_meta = optimizer_to_tensors(opt)
    save_checkpoint(
        model, out, recipe=recipe.to_dict(), epoch=metrics["epoch"], metrics=metrics,
        data_source=data_source,
        train_state=None if last else opt_tensors,
        extra={"optimizer": None if last else opt_meta, "complete": last},
    )
    atomic_write_text(log_path, json.dumps(log_record, indent=2))
    log.info("epoch %d/%d: %s", metrics["epoch"], recipe.epochs, format_metrics(metrics))


def keep_robust_best(model: SymModel, out: Path, recipe: Recipe, history: list[dict[str, Any]],
                      data_source: str, info: DistInfo) -> tuple[dict[str, Any], bool]:
    """Adversarial runs: write ``<stem>.best.safetensors`` when the robust validation accuracy
    sets a record; on catastrophic overfitting with ``stop_on_collapse``, load the best weights
    back into ``model`` and ask the loop to stop (Wong et al. 2020 keep the pre-collapse model).

    Returns:
        (metrics to store in the main checkpoint, whether to stop now).
    """
    metrics, best = history[-1], best_path_for(out)
    if metrics["val_pgd_best"] and info.is_main:
        save_checkpoint(model, best, recipe=recipe.to_dict(), epoch=metrics["epoch"], metrics=metrics,
                        data_source=data_source, extra={"complete": True, "selected_by": "val_pgd_accuracy"})
    if not (metrics["catastrophic_overfitting"] and recipe.adversarial.stop_on_collapse):
        return metrics, False
    barrier(info)  # rank 0 has written the best epoch before anyone reads it back
    state, _ = split_train_state(read_checkpoint(best)[0])
    model.load_state_dict(state)
    kept = max((e for e in history if "val_pgd_accuracy" in e), key=lambda e: e["val_pgd_accuracy"])
    metrics["early_stop"] = f"stopped after epoch {metrics['epoch']}; weights of epoch {kept['epoch']} kept"
    log.warning("catastrophic overfitting: stopping after epoch %d and restoring the weights of epoch %d "
                "(best robust validation accuracy %.4f) into %s", metrics["epoch"], kept["epoch"],
                kept["val_pgd_accuracy"], out)
    return {**kept, "early_stop": metrics["early_stop"]}, True


def restore(out: Path, log_path: Path, model: SymModel, opt: torch.optim.Optimizer, recipe: Recipe,
            data_source: str, world_size: int = 1) -> tuple[int, list[dict[str, Any]]]:
    """Load weights, optimizer state and history of an interrupted run at ``out``.

    The run must be the same one: the same recipe and the same data source as recorded in the
    checkpoint, unfinished, with optimizer state for every parameter. Every rank of a torchrun
    job loads the same file.

    Raises:
        CheckpointError: no checkpoint; a different recipe or data source; a finished run;
            missing optimizer state; a corrupt ``<stem>.log.json`` (named, with the way out).
    """
    if not out.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {out} to resume from")
    tensors, info = read_checkpoint(out)
    _check_same_run(out, info, recipe, data_source)
    state, train_state = split_train_state(tensors)
    meta = _optimizer_meta(out, info, train_state, opt)
    history = _read_history(log_path, out, int(info["epoch"]), world_size)
    model.load_state_dict(state)
    # CPU tensors: load_state_dict moves moments to each parameter's device but keeps Adam's
    # `step` on the CPU, as in an uninterrupted run (a GPU `step` forces a sync every step).
    optimizer_from_tensors(opt, train_state, meta)
    log.info("resuming %s after epoch %d", out, info["epoch"])
    return int(info["epoch"]), history


def _check_same_run(out: Path, info: dict[str, Any], recipe: Recipe, data_source: str) -> None:
    """Refuse to continue a checkpoint of another recipe or data source, or a finished one."""
    # Fields added to Recipe after the checkpoint was written take their default values.
    try:  # normalised, so a checkpoint from before a recipe field existed compares by its default
        saved = Recipe.from_dict({**Recipe().to_dict(), **info["recipe"]}, origin=str(out)).to_dict()
    except RecipeError:
        saved = {**Recipe().to_dict(), **info["recipe"]}
    if saved != recipe.to_dict():
        diff = sorted(k for k in recipe.to_dict() if saved.get(k) != recipe.to_dict()[k])
        raise CheckpointError(f"--resume: {out} was trained with a different recipe (differs in {diff})")
    recorded = info.get("data_source")
    if recorded is not None and recorded != data_source:  # None: written without a source, nothing to compare
        raise CheckpointError(
            f"--resume: {out} was trained on data {recorded!r}, but this run loads {data_source!r}; "
            "pass the --data of the interrupted run to continue it (or start a new run with "
            "--overwrite or another --out)"
        )
    if info["extra"].get("complete"):
        raise CheckpointError(
            f"--resume: {out} is a finished run ({info['epoch']} epochs); nothing to resume"
        )


def _optimizer_meta(out: Path, info: dict[str, Any], train_state: dict[str, torch.Tensor],
                    opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The checkpoint's optimizer metadata, after checking it covers every optimized parameter."""
    meta = info["extra"].get("optimizer")
    num_params = sum(len(group["params"]) for group in opt.param_groups)
    covered = {int(name.split(".")[1]) for name in train_state}
    covered |= {int(i) for i in (meta or {}).get("scalars", {})}
    if meta is None or covered != set(range(num_params)):
        raise CheckpointError(
            f"--resume: {out} lacks optimizer state for {num_params - len(covered)} of {num_params} "
            "parameters (was it written by 'symensemble train'?); cannot continue the run exactly"
        )
    return meta


def _read_history(log_path: Path, out: Path, epochs: int, world_size: int) -> list[dict[str, Any]]:
    """The per-epoch log of the first ``epochs`` epochs ([] when there is no log).

    A log that cannot be read is refused by name: the checkpoint is intact, and moving the log
    aside resumes the run (its new log then starts at the resumed epoch).
    """
    if not log_path.is_file():
        return []
    try:
        record = json.loads(log_path.read_text())
        history = record["epochs"]
        if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
            raise TypeError("'epochs' is not a list of objects")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"--resume: the run's log {log_path} is corrupt or unreadable ({type(err).__name__}: {err}); "
            f"the checkpoint {out} is intact: move the log aside (e.g. mv {log_path} {log_path}.broken) "
            "and resume again — the new log then lacks the epochs before the resumed one"
        ) from None
    if record.get("world_size", 1) != world_size:
        log.warning("resuming a run of %d processes with %d: the per-rank augmentation streams differ, "
                    "so the result will not equal an uninterrupted run", record.get("world_size", 1),
                    world_size)
    return history[:epochs]
