"""Adversarial training: L∞ examples crafted on the fly, and robust-validation monitoring.

The crafting itself is the registered attacks ``fgsm-rs`` and ``pgd-train``
(:mod:`symensemble.robustness.attacks.training`):

* :func:`fgsm_rs` — FGSM with a uniform random start (Wong, Rice & Kolter 2020, "Fast is
  better than free"): δ ~ U(−ε, ε), one signed-gradient step of size α (default 1.25 ε),
  projected onto the ε ball and onto the image range [0, 1].
* :func:`pgd` — projected gradient descent (Madry et al. 2018) with the same
  random start and ``steps`` steps of size α.
* :class:`AdversarialConfig` — the recipe's ``[adversarial]`` table.
* :class:`TrainingAttack` — crafts the training examples of one epoch from a seeded generator.
* :class:`RobustMonitor` — PGD accuracy on a fixed validation batch every epoch, best epoch,
  and catastrophic-overfitting detection (Wong et al. 2020 name it: PGD accuracy collapsing to
  near 0 within an epoch of FGSM training; they stop early and keep the pre-collapse model).

Everything works in batch form on the model's device, on images in [0, 1] (symensemble
models normalise inside), and draws its randomness from explicit generators, so runs are
reproducible and ``train --resume`` matches an uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..robustness.attacks import get_attack
from ..vocab import parse_eps

__all__ = [
    "ADVERSARIAL_METHODS",
    "AdversarialConfig",
    "RobustMonitor",
    "TrainingAttack",
    "detect_collapse",
    "fgsm_rs",
    "parse_eps",
    "pgd",
]

log = logging.getLogger(__name__)

ADVERSARIAL_METHODS = ("none", "fgsm_rs", "pgd")
#: Offset that separates the attack's random stream from shuffling/augmentation of the same epoch.
_ATTACK_STREAM = 7_919


@dataclass(frozen=True)
class AdversarialConfig:
    """The recipe's ``[adversarial]`` table. Radii and step sizes are in [0, 1] pixel units.

    ``alpha = None`` picks the step size of the method's paper: 1.25 ε for FGSM-RS (Wong et
    al. 2020) and 2.5 ε / steps for PGD (Madry et al. 2018).
    """

    method: str = "none"  # none | fgsm_rs | pgd
    eps: float = 8 / 255  # L∞ radius of the training examples
    alpha: float | None = None  # step size; None = the method's default (see above)
    steps: int = 10  # PGD steps (pgd only; fgsm_rs takes one step)
    eps_warmup_epochs: float = 0.0  # ε (and α with it) rises linearly from 0 over these epochs
    val_size: int = 1000  # fixed validation images for the per-epoch robust accuracy
    val_steps: int = 10  # PGD steps of that check (at the training ε, α = 2.5 ε / steps)
    val_seed: int = 0  # which validation images, and the PGD random start of the check
    collapse_drop: float = 0.5  # collapse: robust val acc < (1 − collapse_drop) × best so far
    stop_on_collapse: bool = True  # stop, and put the best epoch's weights in the checkpoint

    def __post_init__(self) -> None:
        checks = [
            (self.method in ADVERSARIAL_METHODS, f"method must be one of {ADVERSARIAL_METHODS}, "
                                                 f"got {self.method!r}"),
            (math.isfinite(self.eps) and 0 < self.eps <= 1, f"eps must be in (0, 1] (pixel units; "
                                                           f"8/255 = {8 / 255:.4f}), got {self.eps}"),
            (self.alpha is None or (math.isfinite(self.alpha) and 0 < self.alpha <= 1),
             f"alpha must be in (0, 1] or omitted, got {self.alpha}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.eps_warmup_epochs >= 0, f"eps_warmup_epochs must be >= 0, got {self.eps_warmup_epochs}"),
            (self.val_size >= 1, f"val_size must be >= 1, got {self.val_size}"),
            (self.val_steps >= 1, f"val_steps must be >= 1, got {self.val_steps}"),
            (0 < self.collapse_drop < 1, f"collapse_drop must be in (0, 1), got {self.collapse_drop}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"[adversarial] {message}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def train_steps(self) -> int:
        """Gradient steps per crafted training example."""
        return 1 if self.method == "fgsm_rs" else self.steps

    def step_size(self, eps: float | None = None) -> float:
        """α for radius ``eps`` (default the training ε); keeps α/ε fixed while ε ramps up."""
        eps = self.eps if eps is None else eps
        if self.alpha is not None:
            return self.alpha * eps / self.eps
        return 1.25 * eps if self.method == "fgsm_rs" else 2.5 * eps / self.steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> AdversarialConfig:
        """Build from the TOML table, with a clear error for unknown keys or wrong types."""
        if isinstance(values, AdversarialConfig):
            return values
        if not isinstance(values, dict):
            raise ValueError(f"[adversarial] must be a table, got {values!r}")
        known = {f.name: f.default for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown keys {unknown} in [adversarial]; known keys: {sorted(known)}")
        typed = {}
        for key, value in values.items():
            default = known[key]
            if key == "alpha" and value is None:
                typed[key] = None
            elif key in ("eps", "alpha", "eps_warmup_epochs", "collapse_drop"):
                typed[key] = parse_eps(value, f"[adversarial] {key}", bounded=False)
            elif not isinstance(value, type(default)) or isinstance(value, bool) != isinstance(default, bool):
                kind = type(default).__name__
                raise ValueError(f"[adversarial] {key} must be of type {kind}, got {value!r}")
            else:
                typed[key] = value
        return cls(**typed)

    def replace(self, **overrides: Any) -> AdversarialConfig:
        """A copy with the non-None ``overrides`` applied (command-line options)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return AdversarialConfig.from_dict({**self.to_dict(), **given})


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
        generator: torch.Generator, random_start: bool = True, amp: bool = False) -> torch.Tensor:
    """L∞ PGD on the cross-entropy (Madry et al. 2018), in batch form: the registered
    ``pgd-train`` attack (:class:`symensemble.robustness.attacks.training.TrainingPGD`).

    x' ← Π_{B_ε(x) ∩ [0,1]} (x' + α · sign ∇_x' CE(f(x'), y)), from x' = x + U(−ε, ε) (clamped
    to [0, 1]) when ``random_start``. The model's mode is left as the caller set it: training
    crafts in train mode (see :class:`TrainingAttack`), evaluation in eval mode. Only the
    input gradient is computed; parameter ``.grad`` fields are untouched.

    Shape:
        x (B, C, H, W) in [0, 1], y (B,) → adversarial images (B, C, H, W) in [0, 1] with
        ‖x' − x‖_∞ ≤ ε.
    """
    attack = get_attack("pgd-train", steps=steps, alpha=alpha, random_start=random_start, amp=amp)
    return attack(model, x, y, eps=eps, generator=generator)[0]


def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float | None = None,
            generator: torch.Generator, amp: bool = False) -> torch.Tensor:
    """FGSM with a uniform random start (Wong, Rice & Kolter 2020): the registered ``fgsm-rs``.

    δ ~ U(−ε, ε); δ ← clip_ε(δ + α · sign ∇_δ CE(f(x + δ), y)); the result is also kept in
    [0, 1]. ``alpha`` defaults to 1.25 ε, the paper's choice (α = 10/255 at ε = 8/255).
    """
    return get_attack("fgsm-rs", alpha=alpha, amp=amp)(model, x, y, eps=eps, generator=generator)[0]


class TrainingAttack:
    """Crafts the adversarial training examples of one epoch.

    The model stays in **train mode** while crafting, as in Madry et al.'s and Wong et al.'s
    reference training code: BatchNorm then normalises the attack's forward passes with the
    statistics of the batch being attacked, exactly as in the update step that follows, so
    the perturbation attacks the function being trained (and, as in their code, those passes
    also update the running statistics). Randomness comes from a generator seeded by the
    epoch's seed on the training device, separate from shuffling and augmentation.
    """

    def __init__(self, config: AdversarialConfig, epoch_seed: int, device: torch.device,
                 steps_per_epoch: int, amp: bool = False) -> None:
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        self.amp = amp
        self.generator = torch.Generator(device=device).manual_seed(epoch_seed + _ATTACK_STREAM)

    def eps_at(self, step: int) -> float:
        """ε at global optimizer step ``step`` (0-based): linear warm-up, then constant."""
        warmup = self.config.eps_warmup_epochs * self.steps_per_epoch
        if warmup <= 0 or step >= warmup:
            return self.config.eps
        return self.config.eps * (step + 1) / warmup

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        eps = self.eps_at(step)
        name = "fgsm-rs" if self.config.method == "fgsm_rs" else "pgd-train"
        attack = get_attack(name, steps=self.config.train_steps, alpha=self.config.step_size(eps),
                            amp=self.amp)
        return attack(model, x, y, eps=eps, generator=self.generator)[0]


def detect_collapse(history: list[float], drop: float) -> bool:
    """Catastrophic overfitting: the latest robust accuracy fell below (1 − drop) × the best before it.

    Wong et al.'s (2020) reference code stops FGSM-RS training when PGD accuracy on a training
    batch drops by more than 0.2 from one epoch to the next; a relative drop from the best so
    far catches the same collapse (to near 0) for models whose robust accuracy is far below theirs.
    """
    if len(history) < 2:
        return False
    best = max(history[:-1])
    return best > 0 and history[-1] < (1 - drop) * best


class RobustMonitor:
    """PGD accuracy on a fixed validation batch, once per epoch; best epoch and collapse.

    The batch (``config.val_size`` images drawn with ``config.val_seed``) and the PGD random
    start are the same every epoch, so the curve moves only with the weights. The attack runs
    in eval mode (the model as it will be used), PGD-``val_steps`` at the training ε with
    α = 2.5 ε / steps.
    """

    def __init__(self, config: AdversarialConfig, images: torch.Tensor, labels: torch.Tensor,
                 batch_size: int, amp: bool = False) -> None:
        if len(labels) == 0:
            raise ValueError("adversarial training needs validation images for its robust check; "
                             "set val_size > 0 in the recipe")
        g = torch.Generator().manual_seed(config.val_seed)
        pick = torch.randperm(len(labels), generator=g)[: config.val_size].to(labels.device)
        self.images, self.labels = images[pick], labels[pick]
        self.config, self.batch_size, self.amp = config, batch_size, amp

    def accuracy(self, model: nn.Module) -> float:
        """Robust accuracy of ``model`` on the fixed batch (PGD, fixed start)."""
        was_training = model.training
        model.eval()
        cfg = self.config
        gen = torch.Generator(device=self.images.device).manual_seed(cfg.val_seed)
        correct = 0
        for start in range(0, len(self.labels), self.batch_size):
            x = self.images[start:start + self.batch_size].float().div(255)
            y = self.labels[start:start + self.batch_size]
            adv = pgd(model, x, y, eps=cfg.eps, alpha=2.5 * cfg.eps / cfg.val_steps, steps=cfg.val_steps,
                      generator=gen, amp=self.amp)
            with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
                correct += int((model(adv).argmax(1) == y).sum())
        model.train(was_training)
        return correct / len(self.labels)

    def update(self, model: nn.Module, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Add ``val_pgd_accuracy``, ``val_pgd_best`` and ``catastrophic_overfitting`` to ``metrics``.

        ``history`` holds the earlier epochs' metrics (restored on ``--resume``), so the best
        so far survives an interruption without extra state.
        """
        acc = self.accuracy(model)
        past = [e["val_pgd_accuracy"] for e in history if "val_pgd_accuracy" in e]
        metrics["val_pgd_accuracy"] = acc
        metrics["val_pgd_best"] = not past or acc > max(past)
        metrics["catastrophic_overfitting"] = detect_collapse([*past, acc], self.config.collapse_drop)
        if metrics["catastrophic_overfitting"]:
            log.warning(
                "catastrophic overfitting at epoch %s: PGD-%d validation accuracy %.4f fell below "
                "%.0f%% of the best so far (%.4f)", metrics.get("epoch"), self.config.val_steps, acc,
                100 * (1 - self.config.collapse_drop), max(past))
