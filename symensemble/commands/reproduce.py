"""``symensemble reproduce``: run a paper-reproduction recipe and compare with the paper."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import click

from ..checkpoint import atomic_write_text

__all__ = ["command"]


@click.command("reproduce", short_help="Run a paper-reproduction recipe (Figures 10-11).")
@click.argument("recipe")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="CIFAR-10 source [default: the recipe's, else $SYMENSEMBLE_DATA or "
                   "~/.cache/symensemble].")
@click.option("--checkpoint", default=None, help="Override the recipe's checkpoint.")
@click.option("--n", type=click.IntRange(min=1), default=None, help="Override the test images.")
@click.option("--seed", type=int, default=None, help="Override the recipe's seed.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Override the recipe's device [default: the recipe's, else auto].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Override the batch size.")
@click.option("--sanity/--no-sanity", default=None,
              help="Run the sanity probes [default: the recipe's, else on].")
@click.option("--figures/--no-figures", default=True, show_default=True, help="Write figures.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: runs/<recipe>-<timestamp>].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(recipe: str, data: Path | None, checkpoint: str | None, n: int | None,
            seed: int | None, device: str | None, batch_size: int | None, sanity: bool | None,
            figures: bool, out: Path | None, quiet: bool) -> None:
    """Run RECIPE (a path, or a name such as paper_fig11_fgsm from recipes/) and compare.

    Prints our table, the sanity-check warnings and our numbers beside the paper's; writes
    the usual results (results.json, results.csv, table.md, figures) plus comparison.md.

    \b
    Recipes shipped in recipes/:
      paper_fig10       clean-accuracy Δ heatmap over num_members × ensemble eps (relu_sqr)
      paper_fig11_fgsm  FGSM grid, transfer and adaptive
      paper_fig11_pgd   PGD iterations grid (eps 0.3, step 0.01), transfer and adaptive
    """
    from ..distributed import is_main_process, shutdown
    from ..evaluation import load_evaluation_recipe
    from ..report import compare_with_paper, markdown_table, warnings_text
    from .attack import evaluate_or_fail, resolve_device, write_or_fail

    try:
        spec = load_evaluation_recipe(recipe)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="RECIPE") from None
    settings = dict(spec.settings)
    overrides = {"data": data, "model": checkpoint, "n": n, "seed": seed,
                 "batch_size": batch_size, "sanity": sanity}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if device is not None:
        settings["device"] = resolve_device(device)
    else:
        settings["device"] = resolve_device(str(settings.get("device", "auto")),
                                            param_hint=f"device in {spec.path}")
    if not quiet and is_main_process():
        click.echo(f"{spec.title}  [{spec.path}]")
    try:
        result = evaluate_or_fail(settings, quiet=quiet, context=f"{spec.path}: ")
        if not is_main_process():
            return
    finally:
        shutdown()
    result.settings["recipe"] = {"path": str(spec.path), "title": spec.title}
    result.settings["command"] = " ".join(shlex.quote(a) for a in ["symensemble", *sys.argv[1:]])
    if out is None:
        out = Path("runs") / f"{spec.path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    written = write_or_fail(result, out, figures=figures)
    comparison = compare_with_paper(result, spec.paper)
    if comparison:
        try:
            atomic_write_text(out / "comparison.md", f"# {spec.title}\n\n{comparison}")
        except OSError as err:
            raise click.BadParameter(f"cannot write {str(out / 'comparison.md')!r}: "
                                     f"{err.strerror or err}", param_hint="--out") from None
        written["comparison.md"] = out / "comparison.md"
    click.echo("")
    click.echo(markdown_table(result))
    click.echo(warnings_text(result))
    if comparison:
        click.echo(comparison)
    click.echo(f"elapsed {result.settings['elapsed_s']:.1f} s; wrote "
               + ", ".join(p.name for p in written.values()) + f" to {out}")
