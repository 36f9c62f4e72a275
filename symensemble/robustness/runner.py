"""Runs the units of a plan batch by batch and returns per-image correctness flags.

Every attack is seeded from (evaluation seed, strength, batch, attacked model), so the flags
do not depend on which other units run or on how batches are spread over processes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .attacks.grid import get_attack
from .config import EvalConfig
from .plan import CLEAN, Kind, Unit
from .records import WHITEBOX, Strength, Target
from .targets import derive_seed
from .threats import get_threat

__all__ = ["Runner"]


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
        preset = get_attack(strength.attack)
        adversarial: dict[str, Tensor] = {}
        rows = []
        for measure in unit.measures:
            threat = get_threat("transfer" if measure.label == WHITEBOX else measure.label)
            src_key, src_module, stochastic = threat.source(self.base, measure.target,
                                                            self.config.attack_aggregate)
            if src_key not in adversarial:
                seed = derive_seed(self.config.seed, strength.key, batch_index, src_key)
                self._reseed(measure.target.module if stochastic else src_module, seed)
                attack = preset.build(src_module, eps=strength.eps, steps=strength.steps,
                                      alpha=strength.alpha, seed=seed % (2**31),
                                      stochastic=stochastic, eot_iter=self.config.eot_iter,
                                      num_classes=self.num_classes)
                adversarial[src_key] = attack(x, y).detach()
            pred = self._predict(measure.target, adversarial[src_key], strength.key, batch_index,
                                 src_key)
            rows.append(pred == y)
        return torch.stack(rows)

    # -- portfolio cascade ---------------------------------------------------------------------

    def _portfolio(self, unit: Unit, x: Tensor, y: Tensor, batch_index: int) -> Tensor:
        """Per component, the images still robust after it (and, in a cascade, every earlier one).

        Shared (transfer) candidates are crafted once on the base model for the whole batch;
        the others on each target, only for the images it still has to be attacked on.
        """
        strength, cfg = unit.strength, self.config
        shared: dict[str, list[Tensor]] = {}
        flags: dict[tuple[str, str], Tensor] = {}
        targets = {m.target.key: m.target for m in unit.measures}  # in measure order
        for key, target in targets.items():
            clean = self._clean(target, x, y, batch_index)
            alive = clean.clone()
            flags[(CLEAN, key)] = clean
            for comp in unit.components:
                todo = alive if cfg.cascade else clean
                idx = todo.nonzero().flatten()
                ok = torch.zeros_like(todo)
                if idx.numel():
                    ok[idx] = self._survives(comp, target, x, y, idx, strength, batch_index, shared)
                alive = alive & ok
                flags[(comp.name, key)] = alive.clone() if cfg.cascade else ok
        return torch.stack([flags[(m.label, m.target.key)] for m in unit.measures])

    def _survives(self, comp, target: Target, x: Tensor, y: Tensor, idx: Tensor,
                  strength: Strength, batch_index: int, shared: dict[str, list[Tensor]]) -> Tensor:
        cfg = self.config
        if comp.shared:
            if comp.name not in shared:
                seed = derive_seed(cfg.seed, strength.key, batch_index, comp.name, self.base.key)
                shared[comp.name] = comp.candidates(
                    self.base.module, x, y, eps=strength.eps, seed=seed,
                    stochastic=self.base.stochastic, eot_iter=cfg.eot_iter,
                    attack_aggregate=cfg.attack_aggregate)
            candidates = [c[idx] for c in shared[comp.name]]
        else:
            seed = derive_seed(cfg.seed, strength.key, batch_index, comp.name, target.key)
            if target.stochastic:
                self._reseed(target.module, seed)
            candidates = comp.candidates(target.module, x[idx], y[idx], eps=strength.eps,
                                         seed=seed, stochastic=target.stochastic,
                                         eot_iter=cfg.eot_iter,
                                         attack_aggregate=cfg.attack_aggregate)
        ok = torch.ones(idx.numel(), dtype=torch.bool, device=y.device)
        for r, adv in enumerate(candidates):
            ok &= self._predict(target, adv, strength.key, batch_index, comp.name, r) == y[idx]
        return ok

