"""Runs the units of a plan batch by batch and returns per-image correctness flags.

:func:`run` is the batch/shard loop (batches spread over the ranks of a ``torchrun`` group,
flags summed back); :class:`Runner` measures one batch of one unit. Every attack is seeded
from (evaluation seed, strength, batch, attacked model) by :func:`derive_seed`, so the flags
do not depend on which other units run or on how batches are spread over processes.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import DistInfo, all_reduce_sum, shard
from ..vocab import CLEAN, WHITEBOX
from .attacks import Attack, get_attack
from .config import EvalConfig
from .plan import Kind, Unit
from .records import Strength, Target
from .threats import get_threat

__all__ = ["Runner", "run", "derive_seed"]


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from ``seed`` and text parts; independent of grid size and world size."""
    crc = zlib.crc32("|".join(str(p) for p in parts).encode())
    return (int(seed) * 0x9E3779B97F4A7C15 + crc) % (2**63 - 1)


def run(units: list[Unit], runner: Runner, x_all: Tensor, y_all: Tensor, info: DistInfo,
        dev: torch.device, progress: bool = False) -> tuple[list[Tensor], list[float]]:
    """Per unit, (measures, n) boolean flags summed over ranks; and each unit's seconds.

    Batches of ``config.batch_size`` images are numbered once and sharded over the ranks, so
    each batch is attacked with the same seeds whatever the world size.
    """
    from tqdm.auto import tqdm

    n, size = len(y_all), runner.config.batch_size
    batches = [(i, slice(s, min(s + size, n))) for i, s in enumerate(range(0, n, size))]
    mine = shard(batches, info)
    flags = [torch.zeros(len(u.measures), n, dtype=torch.int64) for u in units]
    seconds = [0.0] * len(units)
    bar = tqdm(total=len(units) * len(mine), desc="attack", unit="batch",
               disable=not (progress and info.is_main), dynamic_ncols=True)
    try:
        for u, unit in enumerate(units):
            s = unit.strength
            bar.set_postfix_str(f"{s.attack} eps={s.eps:.4g}" + (f" steps={s.steps}" if s.steps else ""))
            tick = time.perf_counter()
            for batch_index, rows in mine:
                got = runner.run_batch(unit, x_all[rows].to(dev), y_all[rows].to(dev), batch_index)
                flags[u][:, rows] = got.to("cpu", torch.int64)
                bar.update(1)
            seconds[u] = time.perf_counter() - tick
    finally:
        bar.close()
    return [all_reduce_sum(f, info, dev).bool() for f in flags], seconds


class Runner:
    """Measures the flags of one batch for one unit (``run_batch``)."""

    def __init__(self, base: Target, config: EvalConfig, num_classes: int) -> None:
        self.base = base
        self.config = config
        self.num_classes = num_classes
        self._clean_cache: dict[tuple[int, str], Tensor] = {}

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

    def _predict(self, target: Target, x: Tensor, *seed_parts: Any) -> Tensor:
        if target.stochastic:
            self._reseed(target.module, derive_seed(self.config.seed, "predict", target.key,
                                                    *seed_parts))
        with torch.no_grad():
            return target.module(x).argmax(dim=1)

    @staticmethod
    def _judge(target: Target) -> Callable[[Tensor], Tensor] | None:
        """How attacks with early stop see a target's verdict: its own prediction (the vote).

        ``None`` for a plain deterministic model, whose prediction is the argmax of the logits
        the attack already computes. A stochastic target draws members from its own stream
        (no reseed inside an attack); the runner's final check still decides.
        """
        if not (hasattr(target.module, "aggregate") or target.stochastic):
            return None
        return lambda images: target.module(images).argmax(dim=1)

    def _clean(self, target: Target, x: Tensor, y: Tensor, batch_index: int) -> Tensor:
        key = (batch_index, target.key)
        if key not in self._clean_cache:
            self._clean_cache[key] = self._predict(target, x, "clean", batch_index) == y
        return self._clean_cache[key]

    def run_batch(self, unit: Unit, x: Tensor, y: Tensor, batch_index: int) -> Tensor:
        """(measures, batch) boolean flags: image correct under that measure."""
        if unit.strength.clean:
            return torch.stack([self._clean(m.target, x, y, batch_index) for m in unit.measures])
        if unit.kind is Kind.GRID:
            return self._grid(unit.strength, unit, x, y, batch_index)
        return self._portfolio(unit, x, y, batch_index)

    # -- paper grid ----------------------------------------------------------------------------

    def _grid(self, strength: Strength, unit: Unit, x: Tensor, y: Tensor, batch_index: int
              ) -> Tensor:
        attack = get_attack(strength.attack, steps=strength.steps, alpha=strength.alpha,
                            eot_iter=self.config.eot_iter, num_classes=self.num_classes)
        adversarial: dict[str, Tensor] = {}
        rows = []
        for measure in unit.measures:
            threat = get_threat("transfer" if measure.label == WHITEBOX else measure.label)
            src_key, src_module, stochastic = threat.source(self.base, measure.target,
                                                            self.config.attack_aggregate)
            if src_key not in adversarial:
                seed = derive_seed(self.config.seed, strength.key, batch_index, src_key)
                self._reseed(measure.target.module if stochastic else src_module, seed)
                [adversarial[src_key]] = attack(src_module, x, y, eps=strength.eps, seed=seed,
                                                stochastic=stochastic)
            pred = self._predict(measure.target, adversarial[src_key], strength.key, batch_index,
                                 src_key)
            rows.append(pred == y)
        return torch.stack(rows)

    # -- portfolio cascade ---------------------------------------------------------------------

    def _portfolio(self, unit: Unit, x: Tensor, y: Tensor, batch_index: int) -> Tensor:
        """Per attack, the images still robust after it (and, in a cascade, every earlier one).

        Shared (transfer) candidates are crafted once on the base model for the whole batch;
        the others on each target, only for the images it still has to be attacked on.
        """
        strength, cascade = unit.strength, self.config.cascade
        shared: dict[str, list[Tensor]] = {}
        flags: dict[tuple[str, str], Tensor] = {}
        targets = {m.target.key: m.target for m in unit.measures}  # in measure order
        for key, target in targets.items():
            clean = self._clean(target, x, y, batch_index)
            alive = clean.clone()
            flags[(CLEAN, key)] = clean
            for attack in unit.components:
                todo = alive if cascade else clean
                idx = todo.nonzero().flatten()
                ok = torch.zeros_like(todo)
                if idx.numel():
                    ok[idx] = self._survives(attack, target, x, y, idx, strength, batch_index,
                                             shared)
                alive = alive & ok
                flags[(attack.name, key)] = alive.clone() if cascade else ok
        return torch.stack([flags[(m.label, m.target.key)] for m in unit.measures])

    def _survives(self, attack: Attack, target: Target, x: Tensor, y: Tensor, idx: Tensor,
                  strength: Strength, batch_index: int, shared: dict[str, list[Tensor]]) -> Tensor:
        """Which images ``idx`` the target classifies correctly on every candidate of ``attack``."""
        if attack.shared:
            if attack.name not in shared:
                seed = derive_seed(self.config.seed, strength.key, batch_index, attack.name,
                                   self.base.key)
                shared[attack.name] = attack(self.base.module, x, y, eps=strength.eps,
                                             seed=seed, stochastic=self.base.stochastic)
            candidates = [c[idx] for c in shared[attack.name]]
        else:
            seed = derive_seed(self.config.seed, strength.key, batch_index, attack.name,
                               target.key)
            if target.stochastic:
                self._reseed(target.module, seed)
            candidates = attack(target.module, x[idx], y[idx], eps=strength.eps, seed=seed,
                                stochastic=target.stochastic, judge=self._judge(target))
        ok = torch.ones(idx.numel(), dtype=torch.bool, device=y.device)
        for r, adv in enumerate(candidates):
            ok &= self._predict(target, adv, strength.key, batch_index, attack.name, r) == y[idx]
        return ok
