"""Evaluation figures of the training loop: loss and accuracy on a split, all-reduced under DDP.

Nothing here depends on the loop itself, so the diagnostics (teleportation's before/after
check) and the checkpoint tests measure a model with the same function the loop logs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..data import Split
from ..distributed import DistInfo, all_reduce_sum, batch_slice
from ..runtime import eval_mode
from .batches import iterate_batches

__all__ = ["evaluate_split", "evaluate_global", "global_means", "format_metrics"]


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, split: Split, batch_size: int = 1000,
                   amp: bool = False) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on a split (already on the model's device)."""
    if len(split) == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    loss = torch.zeros((), dtype=torch.float64, device=split.labels.device)
    correct = torch.zeros((), dtype=torch.int64, device=split.labels.device)
    with eval_mode(model):
        for x, y in iterate_batches(split, batch_size):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
    return {"loss": loss.item() / len(split), "accuracy": correct.item() / len(split)}


def evaluate_global(model: torch.nn.Module, split: Split, batch_size: int, amp: bool,
                    info: DistInfo) -> dict[str, float]:
    """:func:`evaluate_split` with the split shared out over the ranks and the sums all-reduced.

    Every rank must hold the same weights and buffers (see :func:`broadcast_buffers`).
    """
    if not info.enabled:
        return evaluate_split(model, split, batch_size, amp)
    part = batch_slice(len(split), info)
    count = part.stop - part.start
    local = evaluate_split(model, Split(split.images[part], split.labels[part]), batch_size, amp)
    sums = torch.tensor([local["loss"] * count, round(local["accuracy"] * count), count] if count
                        else [0.0] * 3, dtype=torch.float64)
    loss, correct, total = all_reduce_sum(sums, info, split.labels.device).tolist()
    if total == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    return {"loss": loss / total, "accuracy": correct / total}


def global_means(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, info: DistInfo
                  ) -> tuple[float, float]:
    """Mean loss and accuracy over the images of all ranks so far (one all-reduce under DDP)."""
    if not info.enabled:
        return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)
    local = torch.stack([loss_sum.double(), correct.double(),
                         torch.tensor(float(seen), dtype=torch.float64, device=loss_sum.device)])
    total_loss, total_correct, total_seen = all_reduce_sum(local, info, loss_sum.device).tolist()
    return total_loss / max(total_seen, 1), total_correct / max(total_seen, 1)


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
