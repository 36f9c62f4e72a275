"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks", Alg. 1), L∞, with early stop.

One run from a uniform random start in the eps ball: step size η = 2·eps, halved at
checkpoints w_j (first after 22% of the iterations, windows shrinking by 3% down to 6%) when

1. the loss increased in at most ρ = 0.75 of the window's steps (Σ 1[f(x⁽ⁱ⁺¹⁾) > f(x⁽ⁱ⁾)] ≤ ρ·h), or
2. the step was not halved at the previous checkpoint and the best loss has not improved since,

and the iterate then restarts from the best point. Steps use momentum 0.75:
z = P(x⁽ᵏ⁾ + η sign ∇f), x⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + 0.75 (z − x⁽ᵏ⁾) + 0.25 (x⁽ᵏ⁾ − x⁽ᵏ⁻¹⁾)).
Losses: cross-entropy, DLR (Difference of Logits Ratio, shift- and scale-invariant) and the
targeted DLR of APGD-T. Gradients are averaged over ``eot_iter`` forwards on stochastic models.

Early stop: after every step a ``judge`` (the target's own prediction — the vote, for an
ensemble) looks at the iterate; an image it misclassifies keeps that point and leaves the
batch, so later steps run only on images still robust. Every image's trajectory depends only
on its own state, so with and without early stop the run returns the same points (the
first misclassified iterate, else the highest-loss one); early stop only skips work.

Memory does not grow with the step count: the checkpoint test keeps per image a running count
of loss increases in the current window, never a per-iteration history.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["APGDState", "apgd", "dlr_loss", "dlr_targeted_loss", "LOSSES"]

LOSSES = ("ce", "dlr", "dlr-targeted")
Judge = Callable[[Tensor], Tensor]


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3): positive iff misclassified (needs C ≥ 3)."""
    z, _ = logits.sort(dim=1)
    zy = logits.gather(1, y[:, None])[:, 0]
    top_is_y = (logits.argmax(1) == y).to(logits.dtype)
    other = z[:, -2] * top_is_y + z[:, -1] * (1 - top_is_y)
    return -(zy - other) / (z[:, -1] - z[:, -3] + 1e-12)


def dlr_targeted_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2): APGD-T's loss towards class t (needs C ≥ 4)."""
    z, _ = logits.sort(dim=1)
    zy = logits.gather(1, y[:, None])[:, 0]
    zt = logits.gather(1, target[:, None])[:, 0]
    return -(zy - zt) / (z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + 1e-12)


def _loss(name: str, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    need = {"dlr": 3, "dlr-targeted": 4}.get(name, 2)
    if logits.shape[1] < need:
        raise ValueError(f"the {name} loss needs at least {need} classes, got {logits.shape[1]}")
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if name == "dlr":
        return dlr_loss(logits, y)
    return dlr_targeted_loss(logits, y, target)


@dataclass
class APGDState:
    """Per-image state of one run (all (B, ...) tensors; nothing per iteration)."""

    x_adv: Tensor
    x_old: Tensor
    grad: Tensor
    x_best: Tensor
    grad_best: Tensor
    loss_best: Tensor
    loss_prev: Tensor
    increases: Tensor  # loss increases in the current checkpoint window
    loss_best_at_check: Tensor
    reduced_at_check: Tensor
    step: Tensor  # η per image, (B,)
    done: Tensor  # the judge misclassified an iterate
    result: Tensor  # that iterate


def _project(adv: Tensor, x: Tensor, eps: float) -> Tensor:
    return torch.minimum(torch.maximum(adv, x - eps), x + eps).clamp(0, 1)


def _loss_grad(model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, loss: str,
               eot_iter: int) -> tuple[Tensor, Tensor, Tensor]:
    """(per-image loss, input gradient averaged over ``eot_iter`` forwards, last logits)."""
    x = x.detach().requires_grad_(True)
    grad = torch.zeros_like(x)
    for _ in range(eot_iter):
        with torch.enable_grad():
            logits = model(x)
            values = _loss(loss, logits, y, target)
            grad += torch.autograd.grad(values.sum(), x)[0].detach()
    return values.detach(), grad / eot_iter, logits.detach()


def _start(x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    """Uniform random start: x + eps · t / ‖t‖_∞, t ~ U(−1, 1), clamped to [0, 1]."""
    t = 2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1
    scale = t.abs().flatten(1).max(1).values.view(-1, *([1] * (x.dim() - 1))) + 1e-12
    return (x + eps * t / scale).clamp(0, 1)


def _judge(judge: Judge | None, x: Tensor, logits: Tensor) -> Tensor:
    if judge is None:
        return logits.argmax(1)
    with torch.no_grad():
        return judge(x)


def _init(model, x, y, target, eps, loss, eot_iter, generator, judge) -> APGDState:
    x_adv = _start(x, eps, generator)
    values, grad, logits = _loss_grad(model, x_adv, y, target, loss, eot_iter)
    done = _judge(judge, x_adv, logits) != y
    return APGDState(
        x_adv=x_adv, x_old=x_adv.clone(), grad=grad, x_best=x_adv.clone(), grad_best=grad.clone(),
        loss_best=values.clone(), loss_prev=values.clone(), increases=torch.zeros_like(values),
        loss_best_at_check=values.clone(), reduced_at_check=torch.ones_like(values, dtype=torch.bool),
        step=torch.full_like(values, 2 * eps), done=done, result=x_adv.clone())


def _step(s: APGDState, idx: Tensor, x: Tensor, eps: float, momentum: float) -> None:
    """One momentum step of the images ``idx`` (projected onto the ball and [0, 1])."""
    shape = (-1, *([1] * (x.dim() - 1)))
    xa, xo, xi = s.x_adv[idx], s.x_old[idx], x[idx]
    z = _project(xa + s.step[idx].view(shape) * s.grad[idx].sign(), xi, eps)
    s.x_old[idx] = xa
    s.x_adv[idx] = _project(xa + momentum * (z - xa) + (1 - momentum) * (xa - xo), xi, eps)


def _update(s: APGDState, idx: Tensor, values: Tensor, grad: Tensor, fooled: Tensor) -> None:
    """Record the new iterate of ``idx``: judge verdict, best point, loss increases."""
    s.grad[idx] = grad
    new = idx[fooled & ~s.done[idx]]
    s.result[new] = s.x_adv[new]
    s.done[new] = True
    better = values > s.loss_best[idx]
    b = idx[better]
    s.x_best[b] = s.x_adv[b]
    s.grad_best[b] = grad[better]
    s.loss_best[b] = values[better]
    s.increases[idx] += (values > s.loss_prev[idx]).to(values.dtype)
    s.loss_prev[idx] = values


def _checkpoint(s: APGDState, window: int, rho: float) -> None:
    """Halve η where the window oscillated or stalled; restart those from the best point."""
    oscillating = s.increases <= window * rho
    stalled = ~s.reduced_at_check & (s.loss_best_at_check >= s.loss_best)
    reduce = oscillating | stalled
    s.reduced_at_check = reduce
    s.loss_best_at_check = s.loss_best.clone()
    s.step[reduce] /= 2
    s.x_adv[reduce] = s.x_best[reduce]
    s.grad[reduce] = s.grad_best[reduce]
    s.increases.zero_()


def apgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, loss: str = "ce",
         generator: torch.Generator, target: Tensor | None = None, eot_iter: int = 1,
         judge: Judge | None = None, early_stop: bool = True, rho: float = 0.75
         ) -> tuple[Tensor, Tensor]:
    """One APGD run on ``model`` (images in [0, 1] → logits), maximizing ``loss``.

    Args:
        x, y: clean images (B, C, H, W) in [0, 1] and labels (B,).
        eps: L∞ radius; steps: iterations; loss: ``ce``, ``dlr`` or ``dlr-targeted``
            (with ``target`` (B,) classes).
        generator: draws the random start.
        judge: images → predicted labels as the target is scored (default: argmax of
            ``model``'s logits); an image is broken when it disagrees with ``y``.
        early_stop: stop iterating on an image once it is broken.

    Returns:
        (adversarial images: the first broken iterate, else the highest-loss one; broken flags).
    """
    s = _init(model, x, y, target, eps, loss, eot_iter, generator, judge)
    window, counter = max(int(0.22 * steps), 1), 0
    size_decr, window_min = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    everyone = torch.arange(len(y), device=y.device)
    for i in range(steps):
        idx = (~s.done).nonzero().flatten() if early_stop else everyone
        if idx.numel() == 0:
            break
        with torch.no_grad():
            _step(s, idx, x, eps, 0.75 if i > 0 else 1.0)
        t = None if target is None else target[idx]
        values, grad, logits = _loss_grad(model, s.x_adv[idx], y[idx], t, loss, eot_iter)
        _update(s, idx, values, grad, _judge(judge, s.x_adv[idx], logits) != y[idx])
        counter += 1
        if counter == window:
            _checkpoint(s, window, rho)
            counter, window = 0, max(window - size_decr, window_min)
    mask = s.done.view(-1, *([1] * (x.dim() - 1)))
    return torch.where(mask, s.result, s.x_best).detach(), s.done.clone()
