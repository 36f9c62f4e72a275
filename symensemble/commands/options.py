"""Option types and decorators shared by the commands: one list convention, one definition each.

Lists are comma-separated (``--eps 0,0.003``, ``--activation identity,tanh``). Options that
take a list may also be repeated (``--activation identity --activation tanh``); the values of
all occurrences are joined, in order, without duplicates.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

__all__ = [
    "Item",
    "CommaList",
    "one_of",
    "number",
    "list_option",
    "widths_options",
    "seed_option",
    "quiet_option",
    "out_dir_option",
    "data_option",
    "device_option",
    "overwrite_option",
    "model_card_options",
    "model_spec_options",
    "cli_errors",
    "resolve_device",
]


class Item(click.ParamType):
    """One value converted by ``convert`` (a ``ValueError`` becomes a usage error)."""

    def __init__(self, convert: Callable[[str], Any], name: str) -> None:
        self.convert_item = convert
        self.name = name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.convert_item(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


def one_of(names: tuple[str, ...]) -> Callable[[str], str]:
    """Item converter accepting only ``names``."""

    def convert(item: str) -> str:
        if item not in names:
            raise ValueError(f"{item!r} is not one of {', '.join(map(repr, names))}")
        return item

    return convert


def number(positive: bool = False) -> Callable[[str], float]:
    """Item converter to a finite float (``positive``: > 0)."""

    def convert(item: str) -> float:
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"expected comma-separated numbers, got {item!r}") from None
        if not math.isfinite(value) or (positive and value <= 0):
            raise ValueError(f"expected {'positive ' if positive else ''}finite numbers, got {item!r}")
        return value

    return convert


class CommaList(click.ParamType):
    """A comma-separated list, each item converted by ``convert_item`` (errors name the item);
    repeated items are dropped unless ``unique=False`` (values that mean one per position)."""

    name = "list"

    def __init__(self, convert_item: Callable[[str], Any], what: str,
                 choices: Callable[[], list[str]] | None = None, unique: bool = True) -> None:
        self.convert_item = convert_item
        self.what = what
        self.choices = choices
        self.unique = unique

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list:
        if isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            self.fail(f"expected at least one {self.what}", param, ctx)
        out = []
        allowed = self.choices() if self.choices else None
        for item in items:
            if allowed is not None and str(item).strip().lower() not in allowed:
                self.fail(f"unknown {self.what} {item!r}; expected one of {', '.join(allowed)}",
                          param, ctx)
            try:
                out.append(self.convert_item(item) if not isinstance(item, (int, float)) else item)
            except ValueError as err:
                self.fail(str(err), param, ctx)
        return list(dict.fromkeys(out)) if self.unique else out


def _join(ctx: click.Context, param: click.Parameter, value: Any) -> list | None:
    """All occurrences of a repeatable list option as one list (first occurrence first)."""
    if not value:
        return None
    items = [item for part in value for item in part]
    return list(dict.fromkeys(items)) if param.type.unique else items  # type: ignore[attr-defined]


def list_option(*decls: str, item: Callable[[str], Any], what: str, default: Any = None,
                choices: Callable[[], list[str]] | None = None, unique: bool = True,
                help: str = "") -> Callable:
    """A comma-separated, repeatable list option (the command gets a list, or None if unset).

    ``unique=False`` keeps repeated values (per-position lists such as one target per unit).
    """
    return click.option(*decls, type=CommaList(item, what, choices, unique), multiple=True,
                        default=None if default is None else [",".join(map(str, default))],
                        show_default=default is not None, callback=_join,
                        help=f"{help} Comma-separated or repeated.".strip())


def seed_option(default: int | None = 0, help: str = "Random seed.") -> Callable:
    """``--seed``: an integer (``default=None``: the command's recipe decides)."""
    return click.option("--seed", type=int, default=default, show_default=default is not None,
                        help=help)


def quiet_option(help: str = "No progress bars.") -> Callable:
    """``--quiet``: no progress bars."""
    return click.option("--quiet", is_flag=True, help=help)


def out_dir_option(default_hint: str) -> Callable:
    """``--out`` folder; None when not given (the command then uses its default run folder)."""
    return click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help=f"Output folder [default: {default_hint}].")


def overwrite_option(what: str = "--out") -> Callable:
    """``--overwrite``: replace a non-empty output folder whole (see :func:`symensemble.io.check_out_dir`)."""
    return click.option("--overwrite", is_flag=True,
                        help=f"Replace a non-empty {what} (its old files are removed; without this "
                             "flag a non-empty folder is refused).")


_DATA_HELP = "CIFAR-10 source [default: $SYMENSEMBLE_DATA or ~/.cache/symensemble]."


def data_option(help: str = _DATA_HELP) -> Callable:
    """``--data``: a CIFAR-10 source (folder tree, .tar.gz or torchvision root); None = default."""
    return click.option("--data", type=click.Path(path_type=Path), default=None, help=help)


def device_option(default: str | None = "auto", help: str = "Device.") -> Callable:
    """``--device``: auto, cpu or cuda (``default=None``: the command's recipe decides)."""
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=default,
                        show_default=default is not None, help=help)


def model_card_options(fn: Callable) -> Callable:
    """``--model-name``, ``--link``, ``--authors``, ``--venue``: the RobustBench model-info fields
    only the user knows (written as unknown when not given)."""
    for name, what in (("--venue", "venue, e.g. 'ICML 2024'"),
                       ("--authors", "authors, comma-separated"),
                       ("--link", "link to the paper or model page"),
                       ("--model-name", "name (also the file name model_info/cifar10/Linf/<Name>.json)")):
        fn = click.option(name, default=None,
                          help=f"RobustBench model-info {what} [default: marked unknown].")(fn)
    return fn


def model_spec_options(fn: Callable) -> Callable:
    """``--model SPEC`` (any classifier, :func:`symensemble.models.foreign.load_foreign_model`),
    ``--weights``, ``--num-classes``, ``--normalize``, ``--model-dir``."""
    decls = [
        ("--model-dir", dict(type=click.Path(file_okay=False, path_type=Path),
                             help="robustbench: the local model_dir holding its checkpoints.")),
        ("--normalize", dict(help="Input normalization the model expects, applied inside it so it "
                                  "takes [0, 1] images: cifar10, imagenet, none or m,m,m/s,s,s "
                                  "[default: none, the model normalizes itself].")),
        ("--num-classes", dict(type=click.IntRange(min=1), help="Classes of the --model head.")),
        ("--weights", dict(type=click.Path(exists=True, dir_okay=False, path_type=Path),
                           help="Weights of --model: .safetensors, or a .pt/.pth state dict "
                                "(read with weights_only=True).")),
        ("--model", dict(help="A classifier instead of --checkpoint: timm:NAME, torchvision:NAME, "
                              "package.module:factory or robustbench:NAME.")),
    ]
    for name, kw in decls:
        fn = click.option(name, default=None, **kw)(fn)
    return fn


def resolve_device(device: str, param_hint: str = "--device") -> str:
    """:func:`symensemble.runtime.resolve_device` as a device string, errors as click errors.

    Raises:
        click.BadParameter: ``cuda`` asked for but torch sees no CUDA device (``param_hint``
            names where the value came from).
    """
    from ..runtime import resolve_device as resolve  # lazy: `symensemble --help` needs no torch

    try:
        return str(resolve(device))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint=param_hint) from None


@contextlib.contextmanager
def cli_errors(context: str = "", *, checkpoint: str = "--checkpoint", data: str = "--data",
               out: str = "--out") -> Iterator[None]:
    """Library errors as click errors (exit code 2, a clear message); a decorator or a ``with``.

    ``CheckpointError`` names ``checkpoint``, ``DataError`` names ``data``, ``OutputError``
    (:mod:`symensemble.io`) names ``out``; any other ``ValueError`` is a usage error prefixed
    with ``context`` (e.g. a recipe path). Click's own errors pass unchanged; other exceptions
    are bugs and propagate with their traceback.
    """
    from ..checkpoint import CheckpointError  # lazy: `symensemble --help` needs no torch
    from ..data import DataError
    from ..io import OutputError

    try:
        yield
    except click.ClickException:
        raise
    except CheckpointError as err:
        raise click.BadParameter(str(err), param_hint=checkpoint) from None
    except DataError as err:
        raise click.BadParameter(str(err), param_hint=data) from None
    except OutputError as err:
        raise click.BadParameter(str(err), param_hint=out) from None
    except ValueError as err:
        raise click.UsageError(f"{context}{err}") from None


def widths_options(m: int, h: int, n: int) -> Callable:
    """``--m``, ``--h``, ``--n``: output, hidden and input widths of a two-layer problem."""

    def decorate(fn: Callable) -> Callable:
        for name, value, what in (("--n", n, "Input"), ("--h", h, "Hidden"), ("--m", m, "Output")):
            fn = click.option(name, type=click.IntRange(min=1), default=value, show_default=True,
                              help=f"{what} width {name[2:]}.")(fn)
        return fn

    return decorate
