"""``symensemble reproduce``: run a paper-reproduction recipe and compare with the paper."""

from __future__ import annotations

from pathlib import Path

import click

from . import options as opt
from .options import cli_errors, resolve_device

__all__ = ["command"]


@click.command("reproduce", short_help="Run a paper-reproduction recipe (Figures 10-11).")
@click.argument("recipe")
@opt.data_option("CIFAR-10 source [default: the recipe's, else $SYMENSEMBLE_DATA or "
                 "~/.cache/symensemble].")
@click.option("--checkpoint", default=None, help="Override the recipe's checkpoint.")
@click.option("--n", type=click.IntRange(min=1), default=None, help="Override the test images.")
@opt.seed_option(None, "Override the recipe's seed.")
@opt.device_option(None, "Override the recipe's device [default: the recipe's, else auto].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Override the batch size.")
@click.option("--sanity/--no-sanity", default=None,
              help="Run the sanity probes [default: the recipe's, else on].")
@click.option("--figures/--no-figures", default=True, show_default=True, help="Write figures.")
@opt.out_dir_option("runs/<recipe>-<timestamp>")
@opt.overwrite_option()
@opt.quiet_option("No progress bar.")
def command(recipe: str, data: Path | None, checkpoint: str | None, n: int | None,
            seed: int | None, device: str | None, batch_size: int | None, sanity: bool | None,
            figures: bool, out: Path | None, overwrite: bool, quiet: bool) -> None:
    """Run RECIPE (a path, or a name such as paper_fig11_fgsm from recipes/) and compare.

    Prints our table, the sanity-check warnings and our numbers beside the paper's; writes
    the usual results (results.json, results.csv, table.md, figures) plus comparison.md to
    --out (refused when it holds files, unless --overwrite).

    \b
    Recipes shipped in recipes/:
      paper_fig10       clean-accuracy Δ heatmap over num_members × ensemble eps (relu_sqr)
      paper_fig11_fgsm  FGSM grid, transfer and adaptive
      paper_fig11_pgd   PGD iterations grid (eps 0.3, step 0.01), transfer and adaptive
    """
    from ..training.recipe import RecipeError, load_evaluation_recipe
    from .attack import RunOutput, run_and_report

    try:
        spec = load_evaluation_recipe(recipe)
    except RecipeError as err:
        raise click.BadParameter(str(err), param_hint="RECIPE") from None
    overrides = {"n": n, "seed": seed, "batch_size": batch_size, "sanity": sanity}
    overrides["device"] = (resolve_device(device) if device is not None else
                           resolve_device(spec.device, param_hint=f"device in {spec.path}"))
    with cli_errors(f"{spec.path}: "):
        config = spec.config.replace(**{k: v for k, v in overrides.items() if v is not None})
    if not quiet:
        click.echo(f"{spec.title}  [{spec.path}]")
    output = RunOutput(out, figures=figures, quiet=quiet, overwrite=overwrite, name=spec.path.stem)
    run_and_report(config, checkpoint or spec.model, data or spec.data, output,
                   paper=spec.paper, title=spec.title, context=f"{spec.path}: ")
