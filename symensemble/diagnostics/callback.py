"""Record the head's conserved quantity during training (``symensemble train --record-q``)."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .inspection import head_q_summary

__all__ = ["QRecorder"]

log = logging.getLogger(__name__)


class QRecorder:
    """Training callback ``cb(model, epoch, metrics)`` adding the head's Q to the epoch metrics.

    Adds ``metrics[key]`` = {``total``: Σ_k Q_k, ``per_unit``: [Q_k] (if ``per_unit``),
    ``drift``: total − total at the first recorded epoch, ``rel_drift``: drift / max(1, |first|),
    ``group``, ``conserved``}. Under plain gradient flow the drift is zero (Prop. 5.1); SGD with
    a finite step changes Q by O(η²) per step (App. E), and weight decay shrinks it.

    Args:
        key: metrics key to write.
        per_unit: include the per-unit vector (h floats) as well as the total.
        every: record every ``every`` epochs (others are skipped).

    Attributes:
        history: list of (epoch, entry) pairs recorded so far.
    """

    def __init__(self, key: str = "q", per_unit: bool = True, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.key = key
        self.per_unit = per_unit
        self.every = every
        self.first_total: float | None = None
        self.history: list[tuple[int, dict[str, Any]]] = []

    def __call__(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        if epoch % self.every:
            return
        summary = head_q_summary(model)
        total = summary["total"]
        if self.first_total is None:
            self.first_total = total
        drift = total - self.first_total
        entry: dict[str, Any] = {
            "total": total,
            "drift": drift,
            "rel_drift": drift / max(1.0, abs(self.first_total)),
            "group": summary["group"],
            "conserved": summary["conserved"],
        }
        if self.per_unit:
            entry["per_unit"] = summary["per_unit"]
        metrics[self.key] = entry
        self.history.append((epoch, entry))
        log.info("epoch %d: head Q total %.6g (drift %.3g)", epoch, total, drift)
