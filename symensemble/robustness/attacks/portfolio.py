"""The robust-accuracy portfolio: the attacks an image must survive to count as robust.

A defense is only as robust as the strongest attack run against it (Carlini et al. 2019,
"On Evaluating Adversarial Robustness"; Tramer et al. 2020, "On Adaptive Attacks to
Adversarial Example Defenses"). Symmetry ensembles are a textbook case for gradient masking:
member logits reach 1e10, so the softmax of the ``mean`` aggregate saturates and single-step
attacks on it stall while the vote is still easy to flip. The portfolio therefore runs, at
every radius, a cascade of complementary registered attacks in the manner of AutoAttack
(Croce & Hein 2020) — each attack only tries the images that every earlier one left robust:

1. ``pgd-transfer``: PGD with random restarts crafted on the base model (the paper's threat,
   made iterative), and 2. ``fgsm-transfer``: the paper's single-step transfer. Crafted
   once per batch and shared by every target, they are cheap, so they run first.
3. ``apgd-ce``: APGD on the cross-entropy of the target's differentiable aggregate.
4. ``apgd-dlr``: APGD on the Difference-of-Logits-Ratio loss, invariant to the logits'
   shift and scale, so saturation cannot hide the gradient.
5. ``apgd-t``: APGD-T (AutoAttack ``standard``'s targeted DLR over the top 9 classes) on the
   same aggregate — the mean of the members' softmax outputs, where it breaks the most
   ensemble images.
6. ``apgd-softvote``: APGD-CE on a non-saturating surrogate of the vote
   (:class:`~.surrogates.SoftVote`); 7. ``apgd-t-softvote``: APGD-T on the same surrogate
   (ensembles only: on a plain model it would repeat ``apgd-t``).
8. ``square`` (optional): the gradient-free Square attack (Andriushchenko et al. 2020) with a
   query budget, AutoAttack's check against masked gradients.

Members that are redrawn on every forward are attacked with Expectation over Transformation.
Every attack returns *candidates*; an image survives an attack when the target, counted with
its own aggregate (the vote), classifies every candidate correctly. The APGD attacks stop on an
image the moment that scoring misclassifies it (early stop, :mod:`.apgd_core`).
"""

from __future__ import annotations

from typing import Any

from .registry import Attack, get_attack

__all__ = ["PORTFOLIO", "TRANSFER", "GRADIENT_FREE", "portfolio_attacks"]

#: The cascade in the order it runs: cheapest per target first, Square last.
PORTFOLIO = ("pgd-transfer", "fgsm-transfer", "apgd-ce", "apgd-dlr", "apgd-t", "apgd-softvote",
             "apgd-t-softvote", "square")
#: Row labels of attacks that craft on the base model (transfer) and that use no gradient.
TRANSFER = ("pgd-transfer", "fgsm-transfer")
GRADIENT_FREE = ("square",)


def portfolio_attacks(config: Any = None, names: tuple[str, ...] = PORTFOLIO) -> list[Attack]:
    """The registered attacks ``names`` with their options read from ``config``, in order.

    Transfer examples are crafted once per batch on the base model and shared by every
    target, so scoring them costs each target one forward; they run first and leave the
    100-step adaptive attacks only the images they could not break. Square runs last, so the
    images it breaks are images every gradient attack missed (AutoAttack's masking check).
    Attacks switched off by their options (Square with no query budget) are left out.

    Args:
        config: an :class:`~symensemble.robustness.config.EvalConfig` (or any object with its
            fields); ``None`` takes every option's default.
        names: registered attack names.
    """
    attacks = [get_attack(n) if config is None else type(get_attack(n)).from_config(config)
               for n in names]
    return [a for a in attacks if a.enabled]
