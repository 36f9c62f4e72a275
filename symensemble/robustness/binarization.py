"""The binarization test (Zimmermann et al. 2022, "Increasing confidence in adversarial
robustness evaluations"): can the attack find an adversarial example where one surely exists?

For an image x that the evaluation left robust at radius ε, build a binary task that has an
adversarial example inside the ball by construction:

1. an *inner point* x_in = x + (1 − ξ)·ε·s (s a random sign vector, clipped to [0, 1]), and
   *boundary points* x + ε·s_i on the ball's corners;
2. a linear readout r(h) = w·(h − μ)/σ + b on the target's output h(·) (the differentiable
   output the attacks climb: the base model's logits, an ensemble's ``attack_aggregate``),
   fitted by logistic regression so that x and the boundary points score < 0 and x_in > 0;
3. the binarized model g(x') = [0, r(h(x'))] (two logits). x_in lies in the ball and g calls
   it class 1, so an attack on (x, class 0) *must* succeed. A test is valid only when the
   readout separates (x and every boundary point < 0 < x_in); others are counted, not judged.

The same attack as the evaluation's (the portfolio's ``apgd-ce`` with its steps) is run on g;
every valid test it fails is a sign of a weak attack or masked gradients on that target, and
:func:`binarization_checks` reports it as a ``[binarization]`` warning. A readout on the
target's output rather than on penultimate features (the paper's choice) keeps the test the
same for a single model and an ensemble of G heads; the price is a feature space of at most C
dimensions (fewer when the head's width h < C), where the inner point more often falls inside
the hull of the boundary points, and such tests are invalid (counted, not judged).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..vocab import ROBUST, format_eps

__all__ = ["BinaryReadout", "BinarizationResult", "binarization_test", "binarization_checks",
           "INNER_MARGIN", "BOUNDARY_POINTS"]

#: ξ: the inner point lies at (1 − ξ)·ε from x, strictly inside the ball.
INNER_MARGIN = 0.02
#: Boundary points per test (the negatives the readout separates from the inner point).
BOUNDARY_POINTS = 24

Attack = Callable[[nn.Module, Tensor, Tensor, float, int], Tensor]


class BinaryReadout(nn.Module):
    """g(x) = [0, w·(h(x) − μ)/σ + b]: the binarized model (logits of classes 0 and 1)."""

    def __init__(self, features: nn.Module, w: Tensor, b: Tensor, mu: Tensor, sigma: Tensor):
        super().__init__()
        self.features = features
        self.register_buffer("w", w)
        self.register_buffer("b", b)
        self.register_buffer("mu", mu)
        self.register_buffer("sigma", sigma)

    def forward(self, x: Tensor) -> Tensor:
        score = ((self.features(x) - self.mu) / self.sigma) @ self.w + self.b
        return torch.stack([torch.zeros_like(score), score], dim=1)


@dataclass
class BinarizationResult:
    """Tests on one target at one radius: ``valid`` tests, ``failed`` among them (the attack
    missed a guaranteed adversarial example), ``invalid`` ones (no separating readout)."""

    valid: int = 0
    failed: int = 0
    invalid: int = 0

    def add(self, other: BinarizationResult) -> None:
        self.valid += other.valid
        self.failed += other.failed
        self.invalid += other.invalid


def _points(x: Tensor, eps: float, count: int, scale: float, gen: torch.Generator) -> Tensor:
    """``count`` corner points x + scale·ε·s (s random signs), clipped to [0, 1]."""
    signs = torch.randint(0, 2, (count, *x.shape), generator=gen).to(x) * 2 - 1
    return (x.unsqueeze(0) + scale * eps * signs).clamp(0, 1)


def _fit_readout(neg: Tensor, pos: Tensor, steps: int = 200) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Logistic regression of one positive against the negatives (weighted to balance), in
    float64 on standardized features; returns (w, b, μ, σ)."""
    feats = torch.cat([neg, pos.unsqueeze(0)]).double()
    mu, sigma = feats.mean(0), feats.std(0).clamp_min(1e-12)
    z = (feats - mu) / sigma
    target = torch.zeros(len(z), dtype=torch.float64)
    target[-1] = 1.0
    weight = torch.ones_like(target)
    weight[-1] = float(len(neg))
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        logits = z @ w + b
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target, weight=weight)
        loss = loss + 1e-4 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mu, sigma


def binarization_test(features: nn.Module, x: Tensor, eps: float, attack: Attack, *,
                      seed: int = 0, boundary: int = BOUNDARY_POINTS,
                      margin: float = INNER_MARGIN) -> BinarizationResult:
    """The binarization test on each image of ``x`` (images the evaluation left robust).

    Args:
        features: images (B, 3, H, W) in [0, 1] → outputs (B, K); the output the attack climbs.
        x: images (N, 3, H, W) in [0, 1].
        eps: the L∞ radius.
        attack: ``attack(model, x, y, eps, seed)`` → adversarial images (the evaluation's attack).
        seed: seeds the inner and boundary points and the attack.
        boundary: boundary points per image.
        margin: ξ, the inner point's distance below ε (relative).

    Returns:
        The counts of valid, failed and invalid tests.
    """
    out = BinarizationResult()
    gen = torch.Generator().manual_seed(seed)
    for i in range(len(x)):
        inner = _points(x[i].cpu(), eps, 1, 1.0 - margin, gen).to(x)
        corners = _points(x[i].cpu(), eps, boundary, 1.0, gen).to(x)
        with torch.no_grad():
            h = features(torch.cat([x[i:i + 1], corners, inner])).double().cpu()
        w, b, mu, sigma = _fit_readout(h[:-1], h[-1])
        scores = ((h - mu) / sigma) @ w + b
        if not (scores[:-1].max() < 0 < scores[-1]):
            out.invalid += 1  # no linear readout separates the inner point: nothing to judge
            continue
        g = BinaryReadout(features, w.to(x), b.to(x), mu.to(x), sigma.to(x))
        label = torch.zeros(1, dtype=torch.long, device=x.device)
        adv = attack(g, x[i:i + 1], label, eps, seed + i)
        with torch.no_grad():
            found = bool(g(adv).argmax(1).item() == 1)
        out.valid += 1
        out.failed += int(not found)
    return out


def registry_attack(name: str = "apgd-ce", **options: Any) -> Attack:
    """``attack(model, x, y, eps, seed)`` → the first candidate of the registered attack."""
    from .attacks import get_attack

    crafted = get_attack(name, **options)
    return lambda model, x, y, eps, seed: crafted(model, x, y, eps=eps, seed=seed)[0]


def binarization_checks(targets: Sequence[Any], x: Tensor, flags: dict[tuple, Tensor],
                        config: Any, *, per_target: int = 4) -> list[str]:
    """The binarization test on every target of a portfolio run, as ``[binarization]`` warnings.

    For each target, at the largest radius where the portfolio left images robust, up to
    ``per_target`` of those images (the first ones, in subset order) are tested with the
    portfolio's ``apgd-ce`` (``config.apgd_steps``) on the target's attack view. Runs only for
    the portfolio protocol with ``config.sanity`` (else returns []).

    Args:
        targets: the evaluation's :class:`~symensemble.robustness.records.Target` s.
        x: the evaluated images (n, 3, H, W), in subset order.
        flags: per-image correctness by :attr:`Record.key`, as :func:`symensemble.evaluate` keeps.
        config: the run's :class:`~symensemble.robustness.config.EvalConfig`.
    """
    from .attacks import AggregateView

    if not (config.sanity and config.protocol == "portfolio"):
        return []
    attack = registry_attack("apgd-ce", steps=config.apgd_steps)
    warnings = []
    for t in targets:
        robust = {key[5]: f for key, f in flags.items() if key[0] == t.transform
                  and key[1] == t.num_members and key[2] == t.ensemble_eps
                  and key[3] == ROBUST and key[4] == "portfolio" and key[5] > 0 and bool(f.any())}
        if not robust:
            continue
        eps = max(robust)
        idx = robust[eps].nonzero().flatten()[:per_target].to(x.device)
        view = AggregateView.of(t.module, config.attack_aggregate)
        result = binarization_test(view, x[idx], eps, attack, seed=config.seed)
        if result.failed:
            who = t.transform if t.num_members is None else (
                f"{t.transform} (G={t.num_members}, ensemble eps={t.ensemble_eps:g})")
            warnings.append(
                f"[binarization] {who} at eps={format_eps(eps)}: the attack failed {result.failed} "
                f"of {result.valid} binarized tasks that have an adversarial example by "
                "construction (Zimmermann et al. 2022): a weak attack or masked gradients — "
                "do not trust this target's robust accuracy")
    return warnings
