"""Option types and decorators shared by the commands: one list convention, one definition each.

Lists are comma-separated (``--eps 0,0.003``, ``--activation identity,tanh``). Options that
take a list may also be repeated (``--activation identity --activation tanh``); the values of
all occurrences are joined, in order, without duplicates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")


def out_dir_option(default_hint: str) -> Callable:
    """``--out`` folder; None when not given (the command then uses its default run folder)."""
    return click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help=f"Output folder [default: {default_hint}].")


data_option = click.option("--data", type=click.Path(path_type=Path), default=None,
                           help="CIFAR-10 source [default: $SYMENSEMBLE_DATA or ~/.cache/symensemble].")


def widths_options(m: int, h: int, n: int) -> Callable:
    """``--m``, ``--h``, ``--n``: output, hidden and input widths of a two-layer problem."""

    def decorate(fn: Callable) -> Callable:
        for name, value, what in (("--n", n, "Input"), ("--h", h, "Hidden"), ("--m", m, "Output")):
            fn = click.option(name, type=click.IntRange(min=1), default=value, show_default=True,
                              help=f"{what} width {name[2:]}.")(fn)
        return fn

    return decorate
