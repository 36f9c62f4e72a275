"""Record the head's conserved quantity during training (``symensemble train --record-q``)."""

from __future__ import annotations

import logging
import math
from typing import Any

from torch import nn

from .inspection import head_q_summary

__all__ = ["QRecorder"]

log = logging.getLogger(__name__)


class QRecorder:
    """Training callback ``cb(model, epoch, metrics)`` adding the head's Q to the epoch metrics.

    Adds ``metrics[key]`` = {``total``: Σ_k Q_k, ``per_unit``: [Q_k] (if ``per_unit``),
    ``drift``: total − baseline, ``rel_drift``: drift / max(1, |baseline|), ``group``,
    ``conserved``}, where the baseline is the total at the first recorded epoch unless given.

    Q is conserved under gradient flow only (Prop. 5.1). A finite step changes it: plain SGD by
    O(η²) per step (App. E); Adam (the default optimizer) and AdamW rescale the gradient per
    coordinate, which breaks the symmetry's cancellation and changes Q at first order in η; weight
    decay shrinks it as well. The drift therefore measures how far training departs from
    gradient flow, not a numerical error.

    Args:
        key: metrics key to write.
        per_unit: include the per-unit vector (h floats) as well as the total.
        every: record every ``every`` epochs (others are skipped).
        baseline: the run's first recorded total, to continue its drift after a resume (e.g.
            ``history[0][key]["total"]`` of the run's log); None takes the first total recorded
            by this instance.

    Attributes:
        first_total: the baseline in use (None until the first record when not given).
        history: list of (epoch, entry) pairs recorded so far.
    """

    def __init__(
        self, key: str = "q", per_unit: bool = True, every: int = 1, baseline: float | None = None
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if baseline is not None:
            baseline = float(baseline)
            if not math.isfinite(baseline):
                raise ValueError(f"baseline must be finite, got {baseline}")
        self.key = key
        self.per_unit = per_unit
        self.every = every
        self.first_total: float | None = baseline
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
