"""Training recipes: a flat, typed dataclass read from TOML, overridable from the command line."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models import list_models
from ..runtime import PACKAGE_ROOT
from ..symmetry.activations import list_activations
from .adversarial import AdversarialConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Recipe", "RecipeError", "load_recipe", "EvaluationRecipe", "load_evaluation_recipe",
           "resolve_recipe"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")
#: training losses: ``cross_entropy`` on the logits, or ``double_softmax`` — cross-entropy of the
#: softmax *probabilities* (a second softmax inside the loss), as the authors' notebook trains
LOSSES = ("cross_entropy", "double_softmax")


class RecipeError(ValueError):
    """A recipe file or value that is missing, malformed or out of range."""


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a training run. Units are given per field.

    The paper's recipe (App. I and the authors' notebook) is the default: the small CNN with a
    16-wide leaky-ReLU head, Adam at lr 1e-3, batch 32, 10 epochs, no augmentation.
    """

    model: str = "paper_cnn"  # registry name (symensemble.list_models())
    hidden: int = 16  # h, width of the symmetry head
    act: str = "leaky_relu"  # hidden activation σ (symensemble.list_activations())
    act_kwargs: dict[str, Any] = field(default_factory=lambda: {"negative_slope": 0.1})
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 0.0  # L2 (sgd/adam) or decoupled (adamw)
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw
    batch_size: int = 32  # images per step
    eval_batch_size: int = 1000  # images per evaluation batch
    epochs: int = 10
    schedule: str = "constant"  # constant | cosine | onecycle (per-step)
    warmup_epochs: float = 0.0  # linear warm-up (cosine), or the rise fraction * epochs (onecycle)
    label_smoothing: float = 0.0
    loss: str = "cross_entropy"  # cross_entropy | double_softmax (the notebook's; see LOSSES)
    augment: bool = False  # random crop (pad 4) + horizontal flip
    val_size: int = 5000  # training images held out for validation
    split_seed: int = 0  # seed of the validation split, fixed across training seeds
    seed: int = 0  # initialization, shuffling, augmentation
    amp: bool = False  # bfloat16 autocast (CUDA only)
    channels_last: bool = False  # memory format for conv nets on GPU
    # --- fast GPU training (issue #11, recipes/fast_gpu.toml) -----------------------------------
    lookahead_every: int = 0  # k: pull weights to their slow average every k steps and at epoch ends; 0 = off
    lookahead_alpha: float = 0.25  # α of slow ← slow + α(fast − slow) at the end of the run (ramps from 1)
    compile: bool = False  # torch.compile the training forward (CUDA only; ignored on CPU)
    init_samples: int = 5000  # training images seen by a data-dependent init (fast_net's whitening)
    # --- end of the fast GPU block ----------------------------------------------------------------
    # [adversarial] table: adversarial training (method "none" = standard training, the default,
    # so recipes and checkpoints written before the table existed load unchanged).
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.adversarial, AdversarialConfig):
            raise RecipeError("bad recipe: adversarial must be an AdversarialConfig (or, in from_dict, "
                              f"a table), got {self.adversarial!r}")
        checks = [
            (self.hidden >= 1, "hidden must be >= 1"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}"),
            (math.isfinite(self.lr) and self.lr > 0, "lr must be a positive number"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.warmup_epochs <= self.epochs, "warmup_epochs must be in [0, epochs]"),
            (self.val_size >= 0, "val_size must be >= 0"),
            (all(0 <= b < 1 for b in self.betas), "betas must both be in [0, 1)"),
            (self.model in list_models(), f"model must be one of {list_models()}"),
            (self.act in list_activations(), f"act must be one of {list_activations()}"),
            # fast GPU block
            (self.lookahead_every >= 0, "lookahead_every must be >= 0 (0 = no lookahead)"),
            (0 < self.lookahead_alpha <= 1, "lookahead_alpha must be in (0, 1]"),
            (self.init_samples >= 1, "init_samples must be >= 1"),
            (not self.adversarial.enabled or self.val_size > 0,
             "adversarial training checks robust accuracy on validation images every epoch; "
             "set val_size > 0"),
            (self.adversarial.eps_warmup_epochs <= self.epochs, "[adversarial] eps_warmup_epochs must be "
                                                                "in [0, epochs]"),
        ]
        for ok, message in checks:
            if not ok:
                raise RecipeError(f"bad recipe: {message}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], origin: str = "recipe") -> Recipe:
        """Build from a mapping, refusing unknown keys and values of the wrong type."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise RecipeError(f"{origin}: unknown keys {unknown}; known keys: {sorted(known)}")
        typed: dict[str, Any] = {}
        for key, value in values.items():
            default = known[key].default
            if default is dataclasses.MISSING:
                default = known[key].default_factory()  # type: ignore[misc]
            typed[key] = _coerce(key, value, default, origin)
        return cls(**typed)

    def replace(self, **overrides: Any) -> Recipe:
        """A copy with the non-None ``overrides`` applied (command-line options)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return Recipe.from_dict({**self.to_dict(), **given}, origin="override")

    def model_config(self) -> dict[str, Any]:
        """Keyword arguments for :func:`symensemble.create_model`."""
        return {"hidden": self.hidden, "act": self.act, "act_kwargs": dict(self.act_kwargs),
                **self.model_kwargs}


def _coerce(key: str, value: Any, default: Any, origin: str) -> Any:
    expected = type(default)
    if isinstance(default, AdversarialConfig):
        try:
            return AdversarialConfig.from_dict(value)
        except ValueError as err:
            raise RecipeError(f"{origin}: {err}") from None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RecipeError(f"{origin}: {key} must be true or false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, tuple):
        numbers = isinstance(value, list | tuple) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        if not numbers or len(value) != len(default):
            raise RecipeError(f"{origin}: {key} must be a list of {len(default)} numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if not isinstance(value, expected) or isinstance(value, bool) != isinstance(default, bool):
        raise RecipeError(
            f"{origin}: {key} must be of type {expected.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a TOML recipe whose top-level keys (or ``[train]`` table) are :class:`Recipe` fields."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"recipe {path} is not valid TOML: {err}") from None
    data.pop("description", None)
    if "train" in data and isinstance(data["train"], dict):
        data = {**{k: v for k, v in data.items() if k != "train"}, **data["train"]}
    return Recipe.from_dict(data, origin=str(path))


# --------------------------------------------------------------------------------------------
# Evaluation recipes: an [evaluate] table (EvalConfig fields + checkpoint, data) and [paper]
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationRecipe:
    """A TOML evaluation recipe (``recipes/paper_fig11_fgsm.toml``).

    Attributes:
        title: one line saying what is reproduced.
        config: the ``[evaluate]`` table as a validated :class:`~symensemble.robustness.config.EvalConfig`.
        model: the ``checkpoint`` key (path or shipped name).
        data: the ``data`` key, or ``None``.
        device: the ``device`` key (``auto`` when absent; resolved by the command).
        paper: the ``[paper]`` table (reported numbers to compare with), possibly empty.
        path: the file it came from.
    """

    title: str
    config: Any
    model: str
    data: str | None
    device: str
    paper: dict[str, Any]
    path: Path


def resolve_recipe(path_or_name: str | os.PathLike) -> Path:
    """An existing TOML path, or a recipe name looked up in the repository's ``recipes/``.

    Raises:
        RecipeError: nothing found; the message lists the available evaluation recipes.
    """
    candidate = Path(path_or_name).expanduser()
    if candidate.is_file():
        return candidate
    folders = [PACKAGE_ROOT.parent / "recipes", Path.cwd() / "recipes"]  # the repository's recipes/
    name = candidate.name if candidate.suffix == ".toml" else f"{candidate.name}.toml"
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    known = sorted({p.stem for f in folders if f.is_dir() for p in f.glob("paper_*.toml")})
    raise RecipeError(f"no recipe at {str(path_or_name)!r}; give a .toml path or one of {known}")


def load_evaluation_recipe(path_or_name: str | os.PathLike) -> EvaluationRecipe:
    """Read an evaluation recipe: ``title``, an ``[evaluate]`` table, an optional ``[paper]``.

    Recipes that reproduce the paper's figures name ``protocol = "paper"`` (or give an
    ``attack``, which implies it), so they keep the paper's protocol whatever the default is.

    Raises:
        RecipeError: missing file, bad TOML, no ``[evaluate]`` table, unknown keys or bad values.
    """
    from ..robustness.config import EvalConfig

    path = resolve_recipe(path_or_name)
    try:
        payload = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: not valid TOML ({err})") from None
    table = payload.get("evaluate")
    if not isinstance(table, dict):
        raise RecipeError(f"{path}: an evaluation recipe needs an [evaluate] table "
                          "(training recipes go to `symensemble train --recipe`)")
    table = dict(table)
    model = str(table.pop("checkpoint", "paper_cnn"))
    data = table.pop("data", None)
    device = str(table.pop("device", "auto"))
    try:
        config = EvalConfig.from_mapping(table, origin=f"{path} [evaluate]")
    except ValueError as err:
        raise RecipeError(str(err)) from None
    paper = payload.get("paper", {})
    if not isinstance(paper, dict):
        raise RecipeError(f"{path}: [paper] must be a table")
    return EvaluationRecipe(title=str(payload.get("title", path.stem)), config=config,
                            model=model, data=None if data is None else str(data), device=device,
                            paper=paper,
                            path=path)
