"""One readable training loop driven by a :class:`~symensemble.recipe.Recipe`.

Data live on the training device as uint8 tensors; each epoch draws its shuffling and
augmentation from a generator seeded by (seed, epoch), so a run interrupted after epoch k and
resumed with ``resume=True`` ends with the same weights as an uninterrupted run. A checkpoint
(weights + optimizer state) is written atomically after every epoch, and per-epoch metrics go
to ``<out stem>.log.json`` beside it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .adversarial import RobustMonitor, TrainingAttack
from .checkpoint import (
    CheckpointError,
    atomic_write_text,
    git_revision,
    read_checkpoint,
    save_checkpoint,
    split_train_state,
)
from .data import CIFAR10, Split, iterate_batches, load_cifar10
from .models import SymModel, create_model
from .recipe import Recipe, RecipeError

__all__ = ["train", "TrainResult", "evaluate_split", "resolve_device", "format_metrics", "Callback"]

log = logging.getLogger(__name__)

#: ``callback(model, epoch, metrics)`` runs after each epoch; it may add JSON-serializable
#: entries to ``metrics`` (they are logged with the epoch).
Callback = Callable[[SymModel, int, dict[str, Any]], None]


@dataclass
class TrainResult:
    model: SymModel
    history: list[dict[str, Any]]
    checkpoint: Path
    log_path: Path


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None → CUDA when available else CPU; refuses CUDA when there is none."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA GPU; use --device cpu")
    return dev


def _epoch_seed(seed: int, epoch: int) -> int:
    # One stream per epoch: resuming at an epoch boundary replays exactly the same batches.
    return seed * 1_000_003 + epoch


def _lr_factor(recipe: Recipe, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based) for the recipe's schedule."""
    warmup = int(recipe.warmup_epochs * steps_per_epoch)
    if recipe.schedule == "constant":
        return 1.0
    if recipe.schedule == "cosine":
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))
    # onecycle: linear rise from 0.1x to 1x over `warmup`, then linear decay to 0.
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def _build_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    params = model.parameters()
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                               nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    cls = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)


def _optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
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


def _optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, split: Split, batch_size: int = 1000,
                   amp: bool = False) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on a split (already on the model's device)."""
    if len(split) == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    was_training = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=split.labels.device)
    correct = torch.zeros((), dtype=torch.int64, device=split.labels.device)
    for x, y in iterate_batches(split, batch_size):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    return {"loss": loss.item() / len(split), "accuracy": correct.item() / len(split)}


def _train_epoch(
    model: SymModel, opt: torch.optim.Optimizer, train: Split, recipe: Recipe, epoch: int,
    steps_per_epoch: int, progress: bool,
) -> dict[str, float]:
    model.train()
    gen = torch.Generator().manual_seed(_epoch_seed(recipe.seed, epoch))  # shuffling, augmentation
    torch.manual_seed(_epoch_seed(recipe.seed, epoch))  # dropout etc. inside the model
    total_steps = steps_per_epoch * recipe.epochs
    amp = recipe.amp and train.images.device.type == "cuda"
    attack = (TrainingAttack(recipe.adversarial, _epoch_seed(recipe.seed, epoch), train.images.device,
                             steps_per_epoch, amp) if recipe.adversarial.enabled else None)
    loss_sum = torch.zeros((), device=train.images.device)
    correct = torch.zeros((), dtype=torch.int64, device=train.images.device)
    clean_correct = torch.zeros((), dtype=torch.int64, device=train.images.device)
    seen = 0
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{recipe.epochs}", disable=not progress,
               leave=False, dynamic_ncols=True)
    for i, (x, y) in enumerate(iterate_batches(train, recipe.batch_size, shuffle=True,
                                               augment=recipe.augment, generator=gen)):
        factor = _lr_factor(recipe, epoch * steps_per_epoch + i, total_steps, steps_per_epoch)
        for group in opt.param_groups:
            group["lr"] = recipe.lr * factor
        if recipe.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x_fit = x if attack is None else attack(model, x, y, epoch * steps_per_epoch + i)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x_fit)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * y.shape[0]
        correct += (logits.detach().argmax(1) == y).sum()
        if attack is not None:
            clean_correct += _clean_correct(model, x, y, amp)
        seen += y.shape[0]
        bar.update(1)
        if progress and (i % 100 == 0 or i == steps_per_epoch - 1):
            accs = {"acc": correct} if attack is None else {"clean_acc": clean_correct, "adv_acc": correct}
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}",
                            **{k: f"{v.item() / seen:.3f}" for k, v in accs.items()})
    bar.close()
    seen = max(seen, 1)
    if attack is None:
        return {"train_loss": loss_sum.item() / seen, "train_accuracy": correct.item() / seen}
    # Adversarial training: the loss is the adversarial objective; accuracy is reported both ways.
    return {"train_loss": loss_sum.item() / seen, "train_accuracy": clean_correct.item() / seen,
            "train_adv_accuracy": correct.item() / seen,
            "train_eps": attack.eps_at((epoch + 1) * steps_per_epoch - 1)}


@torch.no_grad()
def _clean_correct(model: SymModel, x: torch.Tensor, y: torch.Tensor, amp: bool) -> torch.Tensor:
    """Correct predictions on the clean batch, in eval mode so that BatchNorm running statistics
    and dropout streams are left exactly as the adversarial step alone leaves them."""
    model.eval()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        correct = (model(x).argmax(1) == y).sum()
    model.train()
    return correct


def format_metrics(metrics: dict[str, Any]) -> str:
    """One readable line for an epoch's metrics."""
    adv = ""
    if "train_adv_accuracy" in metrics:
        adv = f" adv acc {metrics['train_adv_accuracy']:.4f}"
    if "val_pgd_accuracy" in metrics:
        adv_val = f"  val pgd acc {metrics['val_pgd_accuracy']:.4f}"
        adv_val += " (best)" if metrics.get("val_pgd_best") else ""
        adv_val += " CATASTROPHIC OVERFITTING" if metrics.get("catastrophic_overfitting") else ""
    else:
        adv_val = ""
    return (f"train loss {metrics['train_loss']:.4f} acc {metrics['train_accuracy']:.4f}{adv}  "
            f"val acc {metrics['val_accuracy']:.4f}  test acc {metrics['test_accuracy']:.4f}{adv_val}  "
            f"({metrics['epoch_seconds']:.1f} s)")


def log_path_for(checkpoint: Path) -> Path:
    """The per-epoch JSON log written beside a checkpoint: ``<stem>.log.json``."""
    return checkpoint.with_name(checkpoint.stem + ".log.json")


def best_path_for(checkpoint: Path) -> Path:
    """The best-by-robust-validation checkpoint of an adversarial run: ``<stem>.best.safetensors``."""
    return checkpoint.with_name(checkpoint.stem + ".best.safetensors")


def default_out(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.model}-{recipe.act}-h{recipe.hidden}-seed{recipe.seed}.safetensors"


def train(
    recipe: Recipe,
    *,
    data: CIFAR10 | str | Path | None = None,
    out: str | Path | None = None,
    device: str | torch.device | None = "auto",
    resume: bool = False,
    callbacks: Iterable[Callback] = (),
    progress: bool = True,
    download: bool = False,
) -> TrainResult:
    """Train ``recipe`` on CIFAR-10, checkpointing every epoch.

    Args:
        recipe: the resolved training recipe.
        data: a loaded :class:`CIFAR10`, or a source for :func:`load_cifar10` (None = default).
        out: checkpoint path (``.safetensors``); default ``runs/<model>-<act>-h<h>-seed<s>.safetensors``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        resume: continue from the checkpoint at ``out`` (same recipe required).
        callbacks: called as ``cb(model, epoch, metrics)`` after each epoch.
        progress: show tqdm bars.
        download: allow torchvision to download CIFAR-10.

    Returns:
        The trained model, the per-epoch history and the paths written.

    The global torch RNG state is restored on return: seeding happens inside.
    """
    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        return _train(recipe, data, out, dev, resume, callbacks, progress, download)


def _train(recipe: Recipe, data: CIFAR10 | str | Path | None, out: str | Path | None, dev: torch.device,
           resume: bool, callbacks: Iterable[Callback], progress: bool, download: bool) -> TrainResult:
    out = Path(out) if out is not None else default_out(recipe)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must be a .safetensors path, got {str(out)!r}")
    log_path = log_path_for(out)
    if not isinstance(data, CIFAR10):
        data = load_cifar10(data, download=download, val_size=recipe.val_size, seed=recipe.split_seed)
    train_split, val, test = data.train.to(dev), data.val.to(dev), data.test.to(dev)

    torch.manual_seed(recipe.seed)
    try:
        model = create_model(recipe.model, **recipe.model_config()).to(dev)
    except ValueError as err:
        raise RecipeError(f"recipe model settings: {err}") from None
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = _build_optimizer(model, recipe)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume:
        start_epoch, history = _restore(out, log_path, model, opt, recipe, dev)

    steps_per_epoch = math.ceil(len(train_split) / recipe.batch_size)
    monitor = (RobustMonitor(recipe.adversarial, val.images, val.labels, recipe.eval_batch_size,
                             recipe.amp and dev.type == "cuda") if recipe.adversarial.enabled else None)
    header = {"recipe": recipe.to_dict(), "data_source": data.source, "device": str(dev),
              "git_revision": git_revision(), "torch_version": torch.__version__}
    for epoch in range(start_epoch, recipe.epochs):
        t0 = time.perf_counter()
        metrics: dict[str, Any] = {"epoch": epoch + 1}
        metrics.update(_train_epoch(model, opt, train_split, recipe, epoch, steps_per_epoch, progress))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        metrics["train_seconds"] = time.perf_counter() - t0
        amp = recipe.amp and dev.type == "cuda"
        for name, split in (("val", val), ("test", test)):
            result = evaluate_split(model, split, recipe.eval_batch_size, amp)
            metrics[f"{name}_loss"], metrics[f"{name}_accuracy"] = result["loss"], result["accuracy"]
        if monitor is not None:
            monitor.update(model, metrics, history)
        metrics["epoch_seconds"] = time.perf_counter() - t0
        for cb in callbacks:
            cb(model, epoch, metrics)
        history.append(metrics)
        saved, stop = metrics, False
        if monitor is not None:
            saved, stop = _keep_robust_best(model, out, recipe, history, data.source)
        last = stop or epoch + 1 == recipe.epochs
        opt_tensors, opt_meta = _optimizer_to_tensors(opt)
        save_checkpoint(
            model, out, recipe=recipe.to_dict(), epoch=saved["epoch"], metrics=saved,
            data_source=data.source,
            train_state=None if last else opt_tensors,
            extra={"optimizer": None if last else opt_meta, "complete": last},
        )
        atomic_write_text(log_path, json.dumps({**header, "epochs": history}, indent=2))
        log.info("epoch %d/%d: %s", epoch + 1, recipe.epochs, format_metrics(metrics))
        if stop:
            break
    model.eval()
    return TrainResult(model, history, out, log_path)


def _keep_robust_best(model: SymModel, out: Path, recipe: Recipe, history: list[dict[str, Any]],
                      data_source: str) -> tuple[dict[str, Any], bool]:
    """Adversarial runs: write ``<stem>.best.safetensors`` when the robust validation accuracy
    sets a record; on catastrophic overfitting with ``stop_on_collapse``, load the best weights
    back into ``model`` and ask the loop to stop (Wong et al. 2020 keep the pre-collapse model).

    Returns:
        (metrics to store in the main checkpoint, whether to stop now).
    """
    metrics, best = history[-1], best_path_for(out)
    if metrics["val_pgd_best"]:
        save_checkpoint(model, best, recipe=recipe.to_dict(), epoch=metrics["epoch"], metrics=metrics,
                        data_source=data_source, extra={"complete": True, "selected_by": "val_pgd_accuracy"})
    if not (metrics["catastrophic_overfitting"] and recipe.adversarial.stop_on_collapse):
        return metrics, False
    state, _ = split_train_state(read_checkpoint(best)[0])
    model.load_state_dict(state)
    kept = max((e for e in history if "val_pgd_accuracy" in e), key=lambda e: e["val_pgd_accuracy"])
    metrics["early_stop"] = f"stopped after epoch {metrics['epoch']}; weights of epoch {kept['epoch']} kept"
    log.warning("catastrophic overfitting: stopping after epoch %d and restoring the weights of epoch %d "
                "(best robust validation accuracy %.4f) into %s", metrics["epoch"], kept["epoch"],
                kept["val_pgd_accuracy"], out)
    return {**kept, "early_stop": metrics["early_stop"]}, True


def _restore(out: Path, log_path: Path, model: SymModel, opt: torch.optim.Optimizer,
             recipe: Recipe, dev: torch.device) -> tuple[int, list[dict[str, Any]]]:
    """Load weights, optimizer state and history of an interrupted run at ``out``."""
    if not out.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {out} to resume from")
    tensors, info = read_checkpoint(out)
    try:  # normalised, so a checkpoint from before a recipe field existed compares by its default
        stored = Recipe.from_dict(info["recipe"], origin=str(out)).to_dict()
    except RecipeError:
        stored = info["recipe"]
    if stored != recipe.to_dict():
        diff = sorted(k for k in recipe.to_dict() if stored.get(k) != recipe.to_dict()[k])
        raise CheckpointError(f"--resume: {out} was trained with a different recipe (differs in {diff})")
    if info["extra"].get("complete"):
        raise CheckpointError(
            f"--resume: {out} is a finished run ({info['epoch']} epochs); nothing to resume"
        )
    state, train_state = split_train_state(tensors)
    meta = info["extra"].get("optimizer")
    num_params = sum(len(group["params"]) for group in opt.param_groups)
    covered = {int(name.split(".")[1]) for name in train_state}
    covered |= {int(i) for i in (meta or {}).get("scalars", {})}
    if meta is None or covered != set(range(num_params)):
        raise CheckpointError(
            f"--resume: {out} lacks optimizer state for {num_params - len(covered)} of {num_params} "
            "parameters (was it written by 'symensemble train'?); cannot continue the run exactly"
        )
    model.load_state_dict(state)
    # CPU tensors: load_state_dict moves moments to each parameter's device but keeps Adam's
    # `step` on the CPU, as in an uninterrupted run (a GPU `step` forces a sync every step).
    _optimizer_from_tensors(opt, train_state, meta)
    history: list[dict[str, Any]] = []
    if log_path.is_file():
        history = json.loads(log_path.read_text())["epochs"][: info["epoch"]]
    log.info("resuming %s after epoch %d", out, info["epoch"])
    return int(info["epoch"]), history
