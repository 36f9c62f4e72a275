"""The robust-accuracy portfolio: the attacks an image must survive to count as robust.

A defense is only as robust as the strongest attack run against it (Carlini et al. 2019,
"On Evaluating Adversarial Robustness"; Tramer et al. 2020, "On Adaptive Attacks to
Adversarial Example Defenses"). Symmetry ensembles are a textbook case for gradient masking:
member logits reach 1e10, so the softmax of the ``mean`` aggregate saturates and single-step
attacks on it stall while the vote is still easy to flip. The portfolio therefore runs, at
every radius, a cascade of complementary attacks in the manner of AutoAttack (Croce & Hein
2020) — each attack only tries the images that every earlier one left robust:

1. ``pgd-transfer``: PGD with random restarts crafted on the base model (the paper's threat,
   made iterative), and 2. ``fgsm-transfer``: the paper's single-step transfer. Crafted
   once per batch and shared by every target, they are cheap, so they run first.
3. ``apgd-ce``: APGD on the cross-entropy of the target's differentiable aggregate.
4. ``apgd-dlr``: APGD on the Difference-of-Logits-Ratio loss, invariant to the logits'
   shift and scale, so saturation cannot hide the gradient.
5. ``apgd-softvote``: APGD-CE on a non-saturating surrogate of the vote
   (:class:`SoftVote`: the mean of member softmaxes after scaling each member's logits to
   unit spread).
6. ``square`` (optional): the gradient-free Square attack (Andriushchenko et al. 2020) with a
   query budget, AutoAttack's check against masked gradients.

Members that are redrawn on every forward are attacked with Expectation over Transformation
(APGD's ``eot_iter``). Every attack returns *candidates*; an image survives an attack when
the target, counted with its own aggregate (the vote), classifies every candidate correctly.
APGD keeps the highest-loss point for images its surrogate could not fool — that point can
still flip the vote — where torchattacks would return the clean image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torchattacks
from torch import Tensor, nn

from .grid import default_alpha

__all__ = ["Component", "APGDAttack", "TransferPGD", "TransferFGSM", "SquareAttack",
           "SoftVote", "AggregateView", "portfolio_components", "GRADIENT_FREE", "TRANSFER"]

#: Row labels of components that craft on the base model (transfer) and that use no gradient.
TRANSFER = ("pgd-transfer", "fgsm-transfer")
GRADIENT_FREE = ("square",)


class AggregateView(nn.Module):
    """A target seen through one differentiable aggregate (``mean`` or ``logit_mean``).

    A plain model (the base) is returned as is by :meth:`of`; a symmetry ensemble is called
    with ``aggregate=...`` so that the shared module is never mutated.

    Shape:
        images (B, 3, H, W) in [0, 1] → (B, C).
    """

    def __init__(self, ensemble: nn.Module, aggregate: str = "mean") -> None:
        super().__init__()
        self.ensemble = ensemble
        self.aggregate = aggregate

    @staticmethod
    def of(module: nn.Module, aggregate: str) -> nn.Module:
        """The view of ``module``; the module itself when it has no aggregates."""
        return AggregateView(module, aggregate) if hasattr(module, "aggregate") else module

    def forward(self, x: Tensor) -> Tensor:
        return self.ensemble(x, aggregate=self.aggregate)


class SoftVote(nn.Module):
    """Non-saturating surrogate of the majority vote: log of the mean scale-free softmax.

    ``log(1/G Σ_k softmax(L_k / s_k))`` where ``s_k`` is the (detached) standard deviation of
    member k's logits over classes, per image. Dividing by ``s_k`` gives every member logits
    of unit spread, so no member with logits of 1e10 dominates the gradient and no softmax
    saturates; the argmax of each member, hence the vote it casts, is unchanged. For a model
    without members (``member_logits``) it is the same map on the model's own logits.

    Shape:
        images (B, 3, H, W) in [0, 1] → (B, C) log-probabilities.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self.module, "member_logits"):
            logits = self.module.member_logits(x)  # (G, B, C)
        elif hasattr(self.module, "aggregate"):  # an ensemble without member access
            logits = self.module(x, aggregate="logit_mean").unsqueeze(0)
        else:
            logits = self.module(x).unsqueeze(0)
        logits = logits.double()
        scale = logits.std(dim=-1, keepdim=True).detach().clamp_min(1e-12)
        probs = torch.softmax(logits / scale, dim=-1).mean(dim=0)
        return probs.clamp_min(1e-300).log().to(x.dtype)


@dataclass(frozen=True)
class Component:
    """One attack of the portfolio.

    Attributes:
        name: the row label (``apgd-ce``, ``pgd-transfer``, ...).
        shared: crafted once on the base model and shared by every target (transfer).
    """

    name: str
    shared: ClassVar[bool] = False

    def candidates(self, model: nn.Module, x: Tensor, y: Tensor, *, eps: float, seed: int,
                   stochastic: bool, eot_iter: int, attack_aggregate: str) -> list[Tensor]:
        """Adversarial candidates for (x, y) inside the L∞ ball of radius ``eps`` and [0, 1].

        Args:
            model: the module to attack: the target (adaptive) or the base model (shared).
            x, y: images in [0, 1] and labels.
            eps: L∞ radius.
            seed: seeds the attack's random starts (it also reseeds torch's global RNG).
            stochastic: ``model`` redraws randomness on every forward (use EOT).
            eot_iter: EOT samples per gradient when stochastic.
            attack_aggregate: the differentiable aggregate of an ensemble target.
        """
        raise NotImplementedError


class _APGD(torchattacks.APGD):
    """torchattacks' APGD, one run, returning the best adversarial or highest-loss point."""

    def run(self, x: Tensor, y: Tensor) -> Tensor:
        x_best, acc, _, x_best_adv = self.attack_single_run(x.clone(), y.clone())
        fooled = (acc == 0).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(fooled, x_best_adv, x_best).detach()


@dataclass(frozen=True)
class APGDAttack(Component):
    """Auto-PGD (Croce & Hein 2020) on the target's own output, ``restarts`` random starts.

    Attributes:
        loss: ``ce`` or ``dlr``.
        surrogate: ``aggregate`` (the target's differentiable aggregate) or ``softvote``.
        steps, restarts: iterations per run and independent runs.
    """

    loss: str = "ce"
    surrogate: str = "aggregate"
    steps: int = 100
    restarts: int = 1

    def candidates(self, model, x, y, *, eps, seed, stochastic, eot_iter, attack_aggregate):
        view = SoftVote(model) if self.surrogate == "softvote" else AggregateView.of(
            model, attack_aggregate)
        out = []
        for r in range(self.restarts):
            torch.manual_seed((seed + r) % (2**63))
            attack = _APGD(view, norm="Linf", eps=eps, steps=self.steps, n_restarts=1,
                           seed=(seed + r) % (2**31), loss=self.loss,
                           eot_iter=eot_iter if stochastic else 1)
            out.append(attack.run(x, y))
        return out


@dataclass(frozen=True)
class TransferPGD(Component):
    """L∞ PGD (Madry et al. 2018) on the base model, ``restarts`` random starts, transferred.

    Step size 2.5·eps/steps. Each restart is a separate candidate: an image survives only if
    the target classifies all of them correctly.
    """

    shared: ClassVar[bool] = True
    steps: int = 20
    restarts: int = 1

    def candidates(self, model, x, y, *, eps, seed, stochastic, eot_iter, attack_aggregate):
        out = []
        for r in range(self.restarts):
            torch.manual_seed((seed + r) % (2**63))
            if stochastic:
                attack = torchattacks.EOTPGD(model, eps=eps, alpha=default_alpha(eps, self.steps),
                                             steps=self.steps, eot_iter=eot_iter, random_start=True)
            else:
                attack = torchattacks.PGD(model, eps=eps, alpha=default_alpha(eps, self.steps),
                                          steps=self.steps, random_start=True)
            out.append(attack(x, y).detach())
        return out


@dataclass(frozen=True)
class TransferFGSM(Component):
    """The paper's single-step FGSM (Goodfellow et al. 2015) on the base model, transferred."""

    shared: ClassVar[bool] = True

    def candidates(self, model, x, y, *, eps, seed, stochastic, eot_iter, attack_aggregate):
        if stochastic:
            attack = torchattacks.EOTPGD(model, eps=eps, alpha=eps, steps=1, eot_iter=eot_iter,
                                         random_start=False)
        else:
            attack = torchattacks.FGSM(model, eps=eps)
        return [attack(x, y).detach()]


@dataclass(frozen=True)
class SquareAttack(Component):
    """Square (Andriushchenko et al. 2020): random search with ``queries`` model queries.

    Run on the target's differentiable aggregate (margin loss); it uses no gradient, so it
    exposes gradient masking when it beats the gradient attacks.
    """

    queries: int = 1000

    def candidates(self, model, x, y, *, eps, seed, stochastic, eot_iter, attack_aggregate):
        torch.manual_seed(seed % (2**63))
        view = AggregateView.of(model, attack_aggregate)
        attack = torchattacks.Square(view, norm="Linf", eps=eps, n_queries=self.queries,
                                     n_restarts=1, seed=seed % (2**31), loss="margin")
        return [attack(x, y).detach()]


def portfolio_components(*, apgd_steps: int = 100, restarts: int = 1, transfer_steps: int = 20,
                         transfer_restarts: int = 1, square_queries: int = 0) -> list[Component]:
    """The cascade in the order it runs: cheapest per target first, Square last.

    Transfer examples are crafted once per batch on the base model and shared by every
    target, so scoring them costs each target one forward; they run first and leave the
    100-step adaptive attacks only the images they could not break. Square runs last, so the
    images it breaks are images every gradient attack missed (AutoAttack's masking check).
    """
    comps: list[Component] = [
        TransferPGD("pgd-transfer", steps=transfer_steps, restarts=transfer_restarts),
        TransferFGSM("fgsm-transfer"),
        APGDAttack("apgd-ce", loss="ce", steps=apgd_steps, restarts=restarts),
        APGDAttack("apgd-dlr", loss="dlr", steps=apgd_steps, restarts=restarts),
        APGDAttack("apgd-softvote", loss="ce", surrogate="softvote", steps=apgd_steps,
                   restarts=restarts),
    ]
    if square_queries > 0:
        comps.append(SquareAttack("square", queries=square_queries))
    return comps

