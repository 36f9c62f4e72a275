"""The attacks adversarial training crafts its examples with (``symensemble train``).

* ``fgsm-rs`` — FGSM with a uniform random start (Wong, Rice & Kolter 2020, "Fast is better
  than free"): δ ~ U(−ε, ε), one signed-gradient step of size α (default 1.25 ε), projected
  onto the ε ball and onto the image range [0, 1].
* ``pgd-train`` — PGD (Madry et al. 2018) with the same random start and ``steps`` steps of
  size α (default 2.5 ε / steps).

Both keep the caller's train/eval mode (training crafts in train mode, as Madry et al.'s and
Wong et al.'s reference code do) and draw their random start from the ``generator`` given
(the epoch's stream), so ``train --resume`` matches an uninterrupted run bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import Attack, Option, register_attack

__all__ = ["TrainingPGD", "FGSMRS", "pgd_steps"]


def _uniform_start(x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + (2 * noise - 1) * eps).clamp(0, 1)


def _project(adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Nearest point of the ε ball around ``x`` intersected with the image box [0, 1]."""
    return torch.minimum(torch.maximum(adv, x - eps), x + eps).clamp(0, 1)


def pgd_steps(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, alpha: float, steps: int,
              generator: torch.Generator, random_start: bool = True, amp: bool = False) -> Tensor:
    """L∞ PGD on the cross-entropy, in batch form, in the model's current mode.

    x' ← Π_{B_ε(x) ∩ [0,1]} (x' + α · sign ∇_x' CE(f(x'), y)), from x' = x + U(−ε, ε) (clamped
    to [0, 1]) when ``random_start``. Only the input gradient is computed; parameter ``.grad``
    fields are untouched.

    Shape:
        x (B, C, H, W) in [0, 1], y (B,) → adversarial images (B, C, H, W) in [0, 1] with
        ‖x' − x‖_∞ ≤ ε.
    """
    adv = _uniform_start(x, eps, generator) if random_start else x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(adv)
        # A summed loss keeps per-example gradients from underflowing (only their sign is used).
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, adv)
        adv = _project(adv.detach() + alpha * grad.sign(), x, eps)
    return adv.detach()


@register_attack
class TrainingPGD(Attack):
    """PGD with a uniform random start, as adversarial training crafts it (caller's mode)."""

    name = "pgd-train"
    kind = "training"
    mode = None
    steps = Option(10, "iterations")
    alpha = Option(None, "step size; None: 2.5 eps / steps (Madry et al. 2018)")
    random_start = Option(True, "start from a uniform random point of the eps ball")
    amp = Option(False, "bfloat16 autocast of the forward passes")

    def step_size(self, eps: float) -> float:
        return 2.5 * eps / self.steps if self.alpha is None else float(self.alpha)

    def craft(self, model, x, y, *, eps, seed, stochastic, generator, judge):
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(seed)
        return [pgd_steps(model, x, y, eps=eps, alpha=self.step_size(eps), steps=self.steps,
                          generator=generator, random_start=self.random_start, amp=self.amp)]


@register_attack
class FGSMRS(TrainingPGD):
    """FGSM with a uniform random start: one step of α (default 1.25 ε, Wong et al. 2020)."""

    name = "fgsm-rs"
    steps = Option(1, "iterations (always 1)")
    alpha = Option(None, "step size; None: 1.25 eps (α = 10/255 at ε = 8/255)")

    def step_size(self, eps: float) -> float:
        return 1.25 * eps if self.alpha is None else float(self.alpha)
