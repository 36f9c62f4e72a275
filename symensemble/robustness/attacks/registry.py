"""The attack protocol: one :class:`Attack` class per attack, registered by name.

As timm registers models, every attack is one small class in its own file, decorated with
:func:`register_attack`; :func:`get_attack` builds one by name and :func:`list_attacks` lists
them. An attack declares its options once, as class attributes holding an :class:`Option`
(default, help text, and — for options a user sets — the :class:`~symensemble.robustness.
config.EvalConfig` field and CLI flag). :func:`attack_options` collects those options, so the
config and ``symensemble attack`` read them from here (:func:`attack_click_options`).

One entry point: ``attack(model, x, y, eps=..., seed=...)`` returns a list of candidate
adversarial images (one per restart) inside the L∞ ball of radius ``eps`` and [0, 1]. The
model's train/eval flags are saved and restored (:attr:`Attack.mode` says which mode the
attack runs in; the training attacks keep the caller's).

    >>> pgd = get_attack("pgd", steps=10)
    >>> [adv] = pgd(model, images, labels, eps=8 / 255, seed=0)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["Attack", "GridAttack", "Option", "register_attack", "get_attack", "list_attacks",
           "attack_options",
           "attack_click_options", "default_alpha", "DEFAULT_EOT_ITER", "KINDS"]

#: EOT samples per gradient when the attacked model is stochastic.
DEFAULT_EOT_ITER = 10
#: What an attack is for: the paper grid (``--attack``), the portfolio cascade, training.
KINDS = ("grid", "portfolio", "training")


def default_alpha(eps: float, steps: int) -> float:
    """Step size ``2.5 · eps / steps`` (Madry et al. 2018): enough to cross the ball and back.

    For the common PGD-10 at eps = 8/255 this gives 2/255, torchattacks' default.
    """
    return 2.5 * eps / max(int(steps), 1)


@dataclass(frozen=True)
class Option:
    """One option of an attack, declared once as a class attribute.

    Attributes:
        default: the value used when none is given.
        help: what it does (the CLI help text for user-facing options).
        field: the :class:`EvalConfig` field (and results.json settings key) that sets it;
            ``None`` for options set per call by the pipeline (the grid's steps, training's α).
        minimum: smallest accepted integer (integer options).
        flag: the CLI flag; default ``--`` + field with dashes (``--x/--no-x`` for booleans).
        external: the field is one of the config's own (validated there, e.g.
            ``attack_aggregate``); the attack only reads it, so it is no attack option.
    """

    default: Any
    help: str
    field: str | None = None
    minimum: int | None = None
    flag: str | None = None
    external: bool = False

    @property
    def cli_flag(self) -> str:
        name = str(self.field).replace("_", "-")
        if self.flag:
            return self.flag
        return f"--{name}/--no-{name}" if isinstance(self.default, bool) else f"--{name}"

    def validate(self, value: Any) -> Any:
        """``value`` checked against the option's type and minimum.

        Raises:
            ValueError: names the field, the value and what was expected.
        """
        if isinstance(self.default, bool):
            if not isinstance(value, bool | int):
                raise ValueError(f"{self.field} must be true or false, got {value!r}")
            return bool(value)
        if isinstance(value, bool) or not isinstance(value, int) or (
                self.minimum is not None and value < self.minimum):
            raise ValueError(f"{self.field} must be an integer >= {self.minimum}, got {value!r}")
        return value


@contextlib.contextmanager
def _model_mode(model: nn.Module, mode: str | None) -> Iterator[None]:
    """Run in ``mode`` ('eval' or 'train'; None keeps the caller's); restore every flag after."""
    flags = [(m, m.training) for m in model.modules()]
    if mode is not None:
        model.train(mode == "train")
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class Attack:
    """Base class of every attack. Subclasses set :attr:`name` and implement :meth:`craft`.

    Class attributes:
        name: the registered name (row label in the portfolio tables, ``--attack`` value).
        kind: ``grid``, ``portfolio`` or ``training`` (see :data:`KINDS`).
        shared: crafted once per batch on the base model and shared by every target
            (transfer attacks of the portfolio).
        mode: the model mode while crafting (``eval``; ``None`` keeps the caller's, as
            adversarial training crafts in train mode).
        eot_iter: EOT samples per gradient on stochastic models.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "grid"
    shared: ClassVar[bool] = False
    mode: ClassVar[str | None] = "eval"
    eot_iter = Option(DEFAULT_EOT_ITER, "EOT samples per gradient on stochastic ensembles.",
                      field="eot_iter", minimum=1)

    def __init__(self, **values: Any) -> None:
        options = self.options()
        unknown = sorted(set(values) - set(options))
        if unknown:
            raise ValueError(f"attack {self.name!r} has no option(s) {unknown}; "
                             f"expected some of {sorted(options)}")
        for key, opt in options.items():
            setattr(self, key, values.get(key, opt.default))

    @classmethod
    def options(cls) -> dict[str, Option]:
        """Attribute name → :class:`Option`, over the class and its bases."""
        out: dict[str, Option] = {}
        for klass in reversed(cls.__mro__):
            out.update({k: v for k, v in vars(klass).items() if isinstance(v, Option)})
        return out

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> Attack:
        """The attack with every option that has a config field read from ``config``."""
        values = {k: getattr(config, o.field) for k, o in cls.options().items()
                  if o.field and hasattr(config, o.field)}
        return cls(**{**values, **overrides})

    @property
    def enabled(self) -> bool:
        """Whether the portfolio runs it (Square with a zero query budget does not)."""
        return True

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, *, eps: float, seed: int = 0,
                 stochastic: bool = False, generator: torch.Generator | None = None,
                 judge: Callable[[Tensor], Tensor] | None = None) -> list[Tensor]:
        """Candidate adversarial images for (x, y): one per restart.

        Args:
            model: images (B, C, H, W) in [0, 1] → logits (B, K); differentiable.
            x, y: images in [0, 1] and int64 labels (B,).
            eps: L∞ radius in [0, 1] pixel units.
            seed: seeds the attack's randomness (attacks built on torchattacks also reseed
                torch's global generator, as torchattacks does).
            stochastic: ``model`` redraws randomness on every forward (use EOT).
            generator: a generator to draw from instead (training's per-epoch stream).
            judge: images → labels as the target is scored (the vote, for an ensemble);
                attacks with early stop drop an image once it disagrees with ``y``.

        Raises:
            ValueError: images outside [0, 1], labels of the wrong shape, eps outside [0, 1].
        """
        _check_inputs(self.name, x, y, eps)
        with _model_mode(model, self.mode):
            return self.craft(model, x, y, eps=float(eps), seed=int(seed), stochastic=stochastic,
                              generator=generator, judge=judge)

    def craft(self, model: nn.Module, x: Tensor, y: Tensor, *, eps: float, seed: int,
              stochastic: bool, generator: torch.Generator | None,
              judge: Callable[[Tensor], Tensor] | None) -> list[Tensor]:
        """The attack itself (inputs already checked, model in :attr:`mode`)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        values = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options())
        return f"{type(self).__name__}({values})"


def _check_inputs(name: str, x: Tensor, y: Tensor, eps: float) -> None:
    if x.dim() < 2 or y.shape != x.shape[:1]:
        raise ValueError(f"attack {name!r}: expected images (B, C, H, W) and labels (B,), got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if not 0.0 <= float(eps) <= 1.0:
        raise ValueError(f"attack {name!r}: eps must be in [0, 1] (pixel units), got {eps}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"attack {name!r}: images must be in [0, 1], got values in "
                         f"[{float(x.min()):.4g}, {float(x.max()):.4g}]")


_REGISTRY: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: make ``cls`` available as ``get_attack(cls.name)``.

    Raises:
        ValueError: no name, an unknown kind, or a name already taken.
    """
    if not cls.name or cls.kind not in KINDS:
        raise ValueError(f"{cls.__name__}: an attack needs a name and a kind in {KINDS}")
    if _REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"attack name {cls.name!r} is already registered by "
                         f"{_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def list_attacks(kind: str | None = None) -> list[str]:
    """Registered attack names, in registration order; only those of ``kind`` if given."""
    return [n for n, c in _REGISTRY.items() if kind is None or c.kind == kind]


def get_attack(name: str, **options: Any) -> Attack:
    """The attack registered as ``name`` (case-insensitive), with ``options`` set.

    Raises:
        ValueError: unknown name (the message lists the known ones) or unknown option.
    """
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown attack {name!r}; expected one of {list_attacks()}")
    return _REGISTRY[key](**options)


#: Options of the pipeline that are not an attack's (the cascade), declared like theirs.
_PIPELINE_OPTIONS = [Option(True, "Portfolio: each attack only tries images still robust (as "
                                  "AutoAttack).", field="cascade")]


def attack_options() -> dict[str, Option]:
    """Config field → :class:`Option`, over every registered attack (and the cascade).

    Raises:
        ValueError: two attacks declare the same field with different defaults.
    """
    out: dict[str, Option] = {}
    declared = [o for c in _REGISTRY.values() for o in c.options().values()] + _PIPELINE_OPTIONS
    for opt in declared:
        if not opt.field or opt.external:
            continue
        if opt.field in out and out[opt.field].default != opt.default:
            raise ValueError(f"option {opt.field!r} is declared with defaults "
                             f"{out[opt.field].default!r} and {opt.default!r}")
        out.setdefault(opt.field, opt)
    return out


def attack_click_options() -> Callable[[Callable], Callable]:
    """A decorator adding one click option per :func:`attack_options` entry (today's flags:
    ``--apgd-steps``, ``--restarts``, ``--transfer-steps``, ``--transfer-restarts``,
    ``--square-queries``, ``--eot-iter``, ``--cascade/--no-cascade``, ``--early-stop/
    --no-early-stop``, ...), each passing its config field as the keyword."""
    import click

    def decorate(command: Callable) -> Callable:
        for opt in reversed(list(attack_options().values())):
            kind = None if isinstance(opt.default, bool) else click.IntRange(min=opt.minimum)
            command = click.option(opt.cli_flag, opt.field, type=kind, default=opt.default,
                                   show_default=True, help=opt.help)(command)
        return command

    return decorate


class GridAttack(Attack):
    """An attack of the paper grid (App. I): strength = (eps, steps, step size), built on
    :mod:`torchattacks` by :meth:`build`; EOT form on stochastic models.

    Class attributes:
        iterative: whether ``steps`` is meaningful (False for FGSM and AutoAttack).
        default_steps: steps used when none are given (``None``: not applicable).
    """

    kind: ClassVar[str] = "grid"
    iterative: ClassVar[bool] = True
    default_steps: ClassVar[int | None] = 10
    steps = Option(None, "iterations (iterative attacks); None: default_steps")
    alpha = Option(None, "step size; None: 2.5·eps/steps (default_alpha)")
    num_classes = Option(10, "classes of the model (AutoAttack's targeted components)")

    @classmethod
    def resolve_steps(cls, steps: int | None) -> int | None:
        """The number of steps actually run (``None`` for attacks without a step count)."""
        if not cls.iterative:
            return cls.default_steps
        return cls.default_steps if steps is None else int(steps)

    @classmethod
    def resolve_alpha(cls, eps: float, steps: int | None, alpha: float | None) -> float | None:
        """The step size actually used: ``alpha`` if given, else :func:`default_alpha`."""
        if not cls.iterative or steps is None:
            return None
        return float(alpha) if alpha is not None else default_alpha(eps, steps)

    def build(self, model: nn.Module, *, eps: float, seed: int = 0, stochastic: bool = False
              ) -> Any:
        """The configured torchattacks attack on ``model`` (images in [0, 1] → logits)."""
        raise NotImplementedError

    def craft(self, model, x, y, *, eps, seed, stochastic, generator, judge):
        torch.manual_seed(seed % (2**63))  # torchattacks draws random starts from torch's RNG
        attack = self.build(model, eps=eps, seed=seed % (2**31), stochastic=stochastic)
        return [attack(x, y).detach()]
