"""The ``symensemble`` command line: one click group, thin commands that call the library.

Each command lives in ``symensemble/commands/<name>.py`` and exposes a click command (or
group) named ``command``; it is registered here so ``symensemble --help`` lists them all.
"""

from __future__ import annotations

import importlib
import logging

import click

from . import __version__

# Modules under symensemble.commands, each defining `command`. Order = order in --help.
_COMMAND_MODULES = [
    "train",
    "attack",
    "reproduce",
    "q",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="symensemble")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Adversarial robustness on CIFAR-10 with parameter-space symmetry ensembles."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


for _module in _COMMAND_MODULES:
    main.add_command(importlib.import_module(f"symensemble.commands.{_module}").command)
