"""Attacks: one registered class per attack (:mod:`.registry`), one small file each.

Importing this package registers every attack: the paper grid's (``fgsm``, ``pgd``,
``eotpgd``, ``apgd``, ``autoattack``, ``autoattack-rand``), the portfolio's (``pgd-transfer``,
``fgsm-transfer``, ``apgd-ce``, ``apgd-dlr``, ``apgd-t``, ``apgd-softvote``, ``apgd-t-softvote``,
``square``) and training's
(``fgsm-rs``, ``pgd-train``).
"""

from . import apgd, apgd_t, autoattack, fgsm, pgd, square, training  # noqa: F401  (registration)
from .portfolio import GRADIENT_FREE, PORTFOLIO, TRANSFER, portfolio_attacks
from .registry import (
    DEFAULT_EOT_ITER,
    Attack,
    GridAttack,
    Option,
    attack_click_options,
    attack_options,
    default_alpha,
    get_attack,
    list_attacks,
    register_attack,
)
from .surrogates import AggregateView, SoftVote

__all__ = ["Attack", "GridAttack", "Option", "register_attack", "get_attack", "list_attacks",
           "attack_options", "attack_click_options", "default_alpha", "DEFAULT_EOT_ITER",
           "PORTFOLIO", "TRANSFER", "GRADIENT_FREE", "portfolio_attacks", "AggregateView",
           "SoftVote"]
