"""One readable training loop driven by a :class:`~symensemble.training.recipe.Recipe`.

Data live on the training device as uint8 tensors; each epoch draws its shuffling and
augmentation from a generator seeded by (seed, epoch), so a run interrupted after epoch k and
resumed with ``resume=True`` ends with the same weights as an uninterrupted run. A checkpoint
(weights + optimizer state) is written atomically after every epoch, and per-epoch metrics go
to ``<out stem>.log.json`` beside it.

Under ``torchrun --nproc_per_node N`` the same loop runs data-parallel (DistributedDataParallel;
gloo on CPU, nccl on GPU). The recipe's ``batch_size`` stays the *global* batch: every rank
draws the same shuffled order, takes its contiguous block of each global batch
(:func:`~symensemble.distributed.batch_slice`) and weights its mean loss by
``n_rank · N / n_global``, so that DDP's average of the ranks' gradients is the gradient of the
mean loss over the whole global batch — the learning rate means the same for any N, and a last
batch that does not split evenly counts every image once. A rank whose block of a (last)
batch is empty still runs the step on one image with weight 0, so that every rank takes part
in the gradient all-reduce. Per-sample randomness (augmentation, and anything else drawn from
the step's generator) comes from a per-rank stream (:func:`_epoch_generators`): reproducible
for a given N, and identical to the single-process stream for N = 1. BatchNorm statistics are
per rank (as in plain DDP); rank 0's running statistics are the ones evaluated and saved. Only
rank 0 writes the checkpoint and the log; logged and displayed figures are all-reduced.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import CIFAR10, Split, load_cifar10
from ..distributed import DistInfo, barrier, batch_slice, broadcast_buffers, current, rank_device
from ..models import SymModel, create_model
from ..runtime import git_revision, resolve_device
from .adversarial import RobustMonitor, TrainingAttack
from .batches import augment_batch, iterate_batches
from .lookahead import Lookahead
from .metrics import evaluate_global, global_means
from .recipe import Recipe, RecipeError
from .state import default_out, keep_robust_best, log_path_for, restore, write_epoch

__all__ = ["train", "TrainResult", "Callback", "DivergenceError", "training_loss"]

log = logging.getLogger(__name__)

#: ``callback(model, epoch, metrics)`` runs after each epoch; it may add JSON-serializable
#: entries to ``metrics`` (they are logged with the epoch).
Callback = Callable[[SymModel, int, dict[str, Any]], None]


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite; the last finished epoch's checkpoint is kept."""


def _check_divergence(metrics: dict[str, Any], num_classes: int) -> None:
    """Stop on a non-finite epoch loss (before its NaN weights are saved); warn on an exploding one.

    A mean cross-entropy far above ln C (chance level) means the steps overshoot.
    """
    loss, epoch, chance = metrics["train_loss"], metrics["epoch"], math.log(num_classes)
    if not math.isfinite(loss):
        raise DivergenceError(
            f"training diverged in epoch {epoch}: the loss is {loss}; the checkpoint of the last "
            "finished epoch is kept (none if this was the first) — lower the learning rate"
        )
    if loss > 10 * chance:
        warnings.warn(f"epoch {epoch}: training loss {loss:.3g} is far above chance level "
                      f"(ln {num_classes} = {chance:.2f}); the run is diverging — lower the learning rate",
                      stacklevel=3)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained model — the weights stored in ``checkpoint``.
        history: the metrics of every epoch run (the log's ``epochs``), including an epoch whose
            weights were discarded (catastrophic overfitting).
        checkpoint, log_path: the files written.
        metrics: the metrics of the weights kept in ``checkpoint``: the last epoch, or after a
            catastrophic-overfitting stop the restored best epoch (with ``early_stop``).
    """

    model: SymModel
    history: list[dict[str, Any]]
    checkpoint: Path
    log_path: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def _epoch_seed(seed: int, epoch: int) -> int:
    # One stream per epoch: resuming at an epoch boundary replays exactly the same batches.
    return seed * 1_000_003 + epoch


def _rank_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of rank ``rank``'s own stream in ``epoch``; rank 0's is the epoch seed itself."""
    if rank == 0:
        return _epoch_seed(seed, epoch)
    # An odd 63-bit constant (golden ratio) spreads ranks far apart from other (seed, epoch) pairs.
    return (_epoch_seed(seed, epoch) + rank * 0x1E3779B97F4A7C15) % 2**63


def _epoch_generators(seed: int, epoch: int, info: DistInfo) -> tuple[torch.Generator, torch.Generator]:
    """(order, per-rank) generators of an epoch.

    ``order`` is seeded alike on every rank: it draws the shuffling, i.e. the global batches.
    The per-rank generator draws everything applied to this rank's share of a batch
    (augmentation, random starts of adversarial examples...). On rank 0 it *is* the order
    generator, continuing after the permutation, so a single process draws exactly the stream
    it always drew; ranks r > 0 get their own seed (:func:`_rank_seed`).
    """
    order = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    if info.rank == 0:
        return order, order
    return order, torch.Generator().manual_seed(_rank_seed(seed, epoch, info.rank))


def _local_batch(x: torch.Tensor, y: torch.Tensor, info: DistInfo
                 ) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """This rank's share of a global batch: images, labels, loss weight, number of images counted.

    DDP averages gradients over the N ranks; weighting rank r's mean loss by n_r·N/n makes that
    average the gradient of the mean loss over all n images (exactly 1.0 for one process). A
    rank with an empty share (n < N) runs one image with weight 0 and counts none.
    """
    part = batch_slice(len(y), info)
    count = part.stop - part.start
    if count == 0:
        return x[:1], y[:1], 0.0, 0
    return x[part], y[part], count * info.world_size / len(y), count


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
    # Frozen parameters (fast_net's whitening filters) get no optimizer state, which --resume checks.
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                               nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    cls = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)


def training_loss(logits: torch.Tensor, y: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """The recipe's training loss on a batch of logits (mean over the batch).

    ``cross_entropy``: the usual loss on the logits. ``double_softmax``: cross-entropy of the
    softmax *probabilities*, ``F.cross_entropy(softmax(z), y)`` — the authors' notebook ends its
    model in a ``Softmax`` and applies ``F.cross_entropy`` to it. That loss is bounded below by
    log(1 + (C − 1)/e) (1.46 for C = 10, reached by one-hot probabilities), and its gradient
    vanishes only as the probabilities saturate, so it drives the logits to a larger scale
    than plain cross-entropy does (std of the logits 36 against 3.7 for the notebook recipe's
    relu_sqr model; docs/reproduction.md). The saved model outputs logits either way.
    """
    if recipe.loss == "double_softmax":
        logits = logits.softmax(dim=1)
    return F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)


def _train_epoch(
    model: SymModel, opt: torch.optim.Optimizer, train: Split, recipe: Recipe, epoch: int,
    steps_per_epoch: int, progress: bool, info: DistInfo, net: torch.nn.Module, lookahead: Lookahead | None,
) -> dict[str, float]:
    """One epoch; ``net`` is what the step calls (``model``, or its DDP/compiled wrapper)."""
    net.train()
    order_gen, gen = _epoch_generators(recipe.seed, epoch, info)  # shuffling; this rank's augmentation
    torch.manual_seed(_rank_seed(recipe.seed, epoch, info.rank))  # dropout etc. inside the model
    total_steps = steps_per_epoch * recipe.epochs
    amp = recipe.amp and train.images.device.type == "cuda"
    # random starts: this rank's own stream (rank 0's is the epoch seed, as in one process)
    attack = (TrainingAttack(recipe.adversarial, _rank_seed(recipe.seed, epoch, info.rank),
                             train.images.device, steps_per_epoch, amp)
              if recipe.adversarial.enabled else None)
    loss_sum = torch.zeros((), device=train.images.device)
    correct = torch.zeros((), dtype=torch.int64, device=train.images.device)
    clean_correct = torch.zeros((), dtype=torch.int64, device=train.images.device)
    seen = 0
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{recipe.epochs}",
               disable=not (progress and info.is_main), leave=False, dynamic_ncols=True)
    for i, (x, y) in enumerate(iterate_batches(train, recipe.batch_size, shuffle=True, generator=order_gen)):
        x, y, weight, count = _local_batch(x, y, info)
        if recipe.augment:
            x = augment_batch(x, gen)
        factor = _lr_factor(recipe, epoch * steps_per_epoch + i, total_steps, steps_per_epoch)
        for group in opt.param_groups:
            group["lr"] = recipe.lr * factor
        if recipe.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x_fit = x if attack is None else attack(model, x, y, epoch * steps_per_epoch + i)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(x_fit)
            loss = training_loss(logits.float(), y, recipe)
        opt.zero_grad(set_to_none=True)
        (loss * weight).backward()  # weight: DDP's mean over ranks = mean over the global batch
        opt.step()
        if lookahead is not None and ((i + 1) % recipe.lookahead_every == 0 or i + 1 == steps_per_epoch):
            lookahead.sync(epoch * steps_per_epoch + i + 1, total_steps)
        if count:
            loss_sum += loss.detach() * count
            correct += (logits.detach().argmax(1) == y).sum()
            if attack is not None:
                clean_correct += _clean_correct(model, x, y, amp)
            seen += count
        bar.update(1)
        if progress and (i % 100 == 0 or i == steps_per_epoch - 1):  # the same steps on every rank
            bar.set_postfix(**_progress_figures(loss_sum, correct, clean_correct, seen, info, attack))
    bar.close()
    mean_loss, accuracy = global_means(loss_sum, correct, seen, info)
    if attack is None:
        return {"train_loss": mean_loss, "train_accuracy": accuracy}
    # Adversarial training: the loss is the adversarial objective; accuracy is reported both ways.
    return {"train_loss": mean_loss, "train_accuracy": global_means(loss_sum, clean_correct, seen, info)[1],
            "train_adv_accuracy": accuracy,
            "train_eps": attack.eps_at((epoch + 1) * steps_per_epoch - 1)}


def _progress_figures(loss_sum: torch.Tensor, correct: torch.Tensor, clean_correct: torch.Tensor,
                      seen: int, info: DistInfo, attack: Any) -> dict[str, str]:
    """The tqdm postfix: global loss and accuracy (clean and adversarial when attacking)."""
    mean_loss, accuracy = global_means(loss_sum, correct, seen, info)
    if attack is None:
        return {"loss": f"{mean_loss:.3f}", "acc": f"{accuracy:.3f}"}
    clean = global_means(loss_sum, clean_correct, seen, info)[1]
    return {"loss": f"{mean_loss:.3f}", "clean_acc": f"{clean:.3f}", "adv_acc": f"{accuracy:.3f}"}


@torch.no_grad()
def _clean_correct(model: SymModel, x: torch.Tensor, y: torch.Tensor, amp: bool) -> torch.Tensor:
    """Correct predictions on the clean batch, in eval mode so that BatchNorm running statistics
    and dropout streams are left exactly as the adversarial step alone leaves them."""
    model.eval()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        correct = (model(x).argmax(1) == y).sum()
    model.train()
    return correct


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

    Under ``torchrun`` every rank calls this with the same arguments inside
    ``with symensemble.distributed.distributed(device):`` (the caller owns the process group,
    as for ``evaluate``; the CLI does this), and it trains
    data-parallel on ``cuda:LOCAL_RANK`` or the CPU, and returns the same model and history
    on every rank; only rank 0 writes ``out`` and its log. Callbacks run on every rank (the
    model is the same everywhere); guard side effects with
    :func:`symensemble.distributed.is_main_process`.
    """
    dev = resolve_device(device)
    info = current()  # the caller joins the process group: `with distributed(dev):`
    dev = rank_device(dev, info)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        return _train(recipe, data, out, dev, resume, callbacks, progress, download, info)


def _training_net(model: SymModel, recipe: Recipe, dev: torch.device, info: DistInfo) -> torch.nn.Module:
    """What the training step calls: the model, DDP-wrapped under torchrun, compiled if asked on CUDA."""
    net: torch.nn.Module = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if recipe.compile:
        if dev.type == "cuda":
            net = torch.compile(net)
        else:
            log.info("recipe compile = true ignored on %s (torch.compile pays on CUDA only)", dev)
    return net


def _init_from_data(model: SymModel, train: Split, recipe: Recipe) -> None:
    """Run the model's data-dependent initialization (fast_net's whitening), if it has one.

    It sees ``recipe.init_samples`` training images drawn with the recipe's seed (the source
    order is class by class, so never a prefix); the global RNG is not touched.
    """
    init = getattr(model, "init_from_data", None)
    if not callable(init):
        return
    gen = torch.Generator().manual_seed(recipe.seed)
    idx = torch.randperm(len(train), generator=gen)[: recipe.init_samples].to(train.images.device)
    init(train.images[idx])


@dataclass
class _Run:
    """Everything one training run holds between epochs (built by :func:`_start`)."""

    model: SymModel
    opt: torch.optim.Optimizer
    net: torch.nn.Module  # what the step calls: the model, or its DDP/compiled wrapper
    lookahead: Lookahead | None
    monitor: RobustMonitor | None
    data: CIFAR10  # on the training device
    header: dict[str, Any]  # the log's run description
    history: list[dict[str, Any]]
    start_epoch: int


def _start(recipe: Recipe, data: CIFAR10, out: Path, log_path: Path, dev: torch.device, resume: bool,
           info: DistInfo) -> _Run:
    """Build the model and optimizer (seeded by the recipe), or restore them with ``resume``."""
    data = CIFAR10(data.train.to(dev), data.val.to(dev), data.test.to(dev), data.classes, data.source)
    torch.manual_seed(recipe.seed)
    try:
        model = create_model(recipe.model, **recipe.model_config()).to(dev)
    except ValueError as err:
        raise RecipeError(f"recipe model settings: {err}") from None
    if not resume:
        _init_from_data(model, data.train, recipe)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = _build_optimizer(model, recipe)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume:
        start_epoch, history = restore(out, log_path, model, opt, recipe, data.source, info.world_size)
    monitor = (RobustMonitor(recipe.adversarial, data.val.images, data.val.labels, recipe.eval_batch_size,
                             recipe.amp and dev.type == "cuda") if recipe.adversarial.enabled else None)
    header = {"recipe": recipe.to_dict(), "data_source": data.source, "device": str(dev),
              "git_revision": git_revision(), "torch_version": torch.__version__}
    if info.enabled:
        header["world_size"] = info.world_size
    lookahead = Lookahead(model, recipe.lookahead_alpha) if recipe.lookahead_every else None
    return _Run(model, opt, _training_net(model, recipe, dev, info), lookahead, monitor, data, header,
                history, start_epoch)


def _epoch(run: _Run, recipe: Recipe, epoch: int, dev: torch.device, info: DistInfo, progress: bool,
           callbacks: Iterable[Callback]) -> dict[str, Any]:
    """Train one epoch, then evaluate (validation, test, robust validation) and run the callbacks."""
    t0 = time.perf_counter()
    steps_per_epoch = math.ceil(len(run.data.train) / recipe.batch_size)
    metrics: dict[str, Any] = {"epoch": epoch + 1}
    metrics.update(_train_epoch(run.model, run.opt, run.data.train, recipe, epoch, steps_per_epoch, progress,
                                info, run.net, run.lookahead))
    _check_divergence(metrics, run.model.head.num_classes)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    metrics["train_seconds"] = time.perf_counter() - t0
    amp = recipe.amp and dev.type == "cuda"
    broadcast_buffers(run.model, info)  # every rank evaluates (and rank 0 saves) rank 0's BN statistics
    for name, split in (("val", run.data.val), ("test", run.data.test)):
        result = evaluate_global(run.model, split, recipe.eval_batch_size, amp, info)
        metrics[f"{name}_loss"], metrics[f"{name}_accuracy"] = result["loss"], result["accuracy"]
    if run.monitor is not None:
        run.monitor.update(run.model, metrics, run.history)
    metrics["epoch_seconds"] = time.perf_counter() - t0
    for cb in callbacks:
        cb(run.model, epoch, metrics)
    return metrics


def _train(recipe: Recipe, data: CIFAR10 | str | Path | None, out: str | Path | None, dev: torch.device,
           resume: bool, callbacks: Iterable[Callback], progress: bool, download: bool,
           info: DistInfo) -> TrainResult:
    out = Path(out) if out is not None else default_out(recipe)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must be a .safetensors path, got {str(out)!r}")
    log_path = log_path_for(out)
    if not isinstance(data, CIFAR10):
        data = load_cifar10(data, download=download, val_size=recipe.val_size, seed=recipe.split_seed)
    run = _start(recipe, data, out, log_path, dev, resume, info)
    saved: dict[str, Any] = run.history[-1] if run.history else {}
    for epoch in range(run.start_epoch, recipe.epochs):
        run.history.append(_epoch(run, recipe, epoch, dev, info, progress, callbacks))
        saved, stop = run.history[-1], False  # adversarial runs may keep an earlier, more robust epoch
        if run.monitor is not None:
            saved, stop = keep_robust_best(run.model, out, recipe, run.history, data.source, info)
        if info.is_main:
            write_epoch(run.model, run.opt, out, log_path, recipe, saved, data.source,
                        {**run.header, "epochs": run.history}, final=stop)
        if stop:
            break
    barrier(info)  # the last checkpoint exists when any rank returns
    run.model.eval()
    return TrainResult(run.model, run.history, out, log_path, saved)
