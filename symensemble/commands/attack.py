"""``symensemble attack``: robust accuracy of a model and its symmetry ensembles."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..robustness.attacks import DEFAULT_EOT_ITER, list_attacks
from ..robustness.config import PROTOCOLS
from ..robustness.records import DEFAULT_TRANSFORMS, THREATS, parse_eps, transform_choices
from .options import CommaList

__all__ = ["command", "CommaList", "run_and_report", "resolve_device"]


def _int_item(minimum: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise ValueError(f"{value} is below the minimum {minimum}")
        return value

    return convert


def _nonneg_float(text: str) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{text!r} must be a finite number >= 0")
    return value


def _alpha(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        alpha = parse_eps(value)
    except ValueError:
        alpha = -1.0  # parse_eps's message talks about eps; the step size gets its own below
    if alpha <= 0:
        raise click.BadParameter(f"must be > 0 and <= 1: the step size in pixel units of images in [0, 1] "
                                 f"(a number or a fraction like 2/255); got {value!r}", ctx, param)
    return alpha


def resolve_device(device: str, param_hint: str = "--device") -> str:
    """:func:`symensemble.runtime.resolve_device` as a device string, errors as click errors.

    Raises:
        click.BadParameter: ``cuda`` asked for but torch sees no CUDA device (``param_hint``
            names where the value came from).
    """
    from ..runtime import resolve_device as resolve

    try:
        return str(resolve(device))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint=param_hint) from None


def _evaluate(config: Any, model: str, data: Path | None, *, quiet: bool, context: str = ""):
    """:func:`symensemble.evaluate` inside the torchrun process group, errors as click errors.

    A bad checkpoint names ``--checkpoint``, bad data ``--data``; any other ``ValueError`` is
    a usage error (prefixed with ``context``, e.g. the recipe path). Other exceptions are
    bugs and propagate unchanged. Returns ``None`` on ranks other than 0.
    """
    from ..checkpoint import CheckpointError
    from ..data import DataError
    from ..distributed import distributed
    from ..robustness.evaluation import evaluate

    try:
        with distributed(config.device) as info:
            result = evaluate(model, data, config, progress=not quiet)
            return result if info.is_main else None
    except CheckpointError as err:
        raise click.BadParameter(str(err), param_hint="--checkpoint") from None
    except DataError as err:
        raise click.BadParameter(str(err), param_hint="--data") from None
    except ValueError as err:
        raise click.UsageError(f"{context}{err}") from None


def _write(result: Any, out: Path, *, figures: bool, extra: dict[str, str]) -> dict[str, Path]:
    from ..robustness.report import write_results

    try:
        return write_results(result, out, figures=figures, extra=extra)
    except OSError as err:
        raise click.BadParameter(
            f"cannot write the results to {str(out)!r}: {err.strerror or err}; expected a "
            "folder that can be created and written", param_hint="--out") from None


def run_and_report(config: Any, model: str, data: Path | None, out: Path | None, *,
                   figures: bool, quiet: bool, name: str = "attack",
                   paper: dict[str, Any] | None = None, title: str | None = None,
                   context: str = "") -> None:
    """Evaluate, then (rank 0) print the tables and write ``out`` — shared by attack/reproduce.

    Args:
        config: the :class:`~symensemble.robustness.config.EvalConfig` to run.
        model, data: checkpoint and data source.
        out: output folder; default ``runs/<name>-<timestamp>``.
        figures: write the figures.
        quiet: no progress bar.
        name: the default folder's prefix.
        paper: a recipe's ``[paper]`` table: also write and print comparison.md.
        title: the recipe's title (recorded in the settings and comparison.md).
        context: prefix of usage errors (the recipe path).
    """
    from ..io import default_run_dir
    from ..robustness.report import compare_with_paper, markdown_table, portfolio_table, warnings_text

    result = _evaluate(config, model, data, quiet=quiet, context=context)
    if result is None:
        return
    result.settings["command"] = " ".join(shlex.quote(a) for a in ["symensemble", *sys.argv[1:]])
    if title is not None:
        result.settings["recipe"] = {"path": context.rstrip(": "), "title": title}
    comparison = compare_with_paper(result, paper) if paper else ""
    extra = {"comparison.md": f"# {title}\n\n{comparison}"} if comparison else {}
    out = out or default_run_dir(name)
    written = _write(result, out, figures=figures, extra=extra)
    click.echo("")
    click.echo(markdown_table(result))
    per_attack = portfolio_table(result)
    if per_attack:
        click.echo("\nPer attack (robust accuracy after each attack of the cascade; "
                   "images it broke in parentheses):\n")
        click.echo(per_attack)
    click.echo(warnings_text(result))
    if comparison:
        click.echo(comparison)
    click.echo(f"elapsed {result.settings['elapsed_s']:.1f} s; wrote "
               + ", ".join(p.name for p in written.values()) + f" to {out}")


def _build_config(**options: Any) -> Any:
    from ..robustness.config import EvalConfig

    try:
        return EvalConfig(**{k: v for k, v in options.items() if v is not None})
    except ValueError as err:
        raise click.UsageError(str(err)) from None


@click.command("attack", short_help="Robust accuracy of a model and its symmetry ensembles.")
@click.option("--checkpoint", default="paper_cnn", show_default=True,
              help="Checkpoint .safetensors path or shipped name.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="CIFAR-10 source: class-folder tree, .tar.gz, or torchvision root "
                   "[default: $SYMENSEMBLE_DATA or ~/.cache/symensemble].")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default=None,
              help="portfolio: robust only if an image survives every attack of a strong "
                   "cascade (the default); paper: the paper's transfer-FGSM grid (implied by "
                   "--attack/--steps/--alpha/--threat); autoattack: AutoAttack standard at 8/255.")
@click.option("--n", type=click.IntRange(min=1), default=None,
              help="Test images (seeded, stratified by class) [default: 500 portfolio, 1000 otherwise].")
@click.option("--eps", "eps", type=CommaList(parse_eps, "eps"), default=None,
              help="L∞ radii in [0, 1] pixel units, comma-separated; fractions like 8/255 work "
                   "[default: 0,0.006,0.012,8/255 portfolio; 0,0.003,...,0.012 paper; 0,8/255 "
                   "autoattack].")
@click.option("--attack", "attacks", type=CommaList(str, "attack", lambda: list_attacks("grid")),
              default=None, help=f"Paper grid: attack(s): {', '.join(list_attacks('grid'))} "
                   "[default: fgsm].")
@click.option("--steps", type=CommaList(_int_item(0), "steps"), default=None,
              help="Paper grid: iterations of iterative attacks, comma-separated (0 = clean) "
                   "[default: 10 for pgd, apgd, eotpgd].")
@click.option("--alpha", callback=_alpha, default=None,
              help="Paper grid: step size in pixel units (e.g. 2/255) [default: 2.5·eps/steps].")
@click.option("--threat", "threats", type=CommaList(str, "threat", lambda: list(THREATS)),
              default=None, help="Paper grid: transfer (crafted on the base model), adaptive "
                                 "(on each ensemble), or both [default: both].")
@click.option("--apgd-steps", type=click.IntRange(min=1), default=100, show_default=True,
              help="Portfolio: iterations of each adaptive APGD.")
@click.option("--restarts", type=click.IntRange(min=1), default=1, show_default=True,
              help="Portfolio: random restarts of each adaptive APGD.")
@click.option("--transfer-steps", type=click.IntRange(min=1), default=20, show_default=True,
              help="Portfolio: PGD iterations crafted on the base model.")
@click.option("--transfer-restarts", type=click.IntRange(min=1), default=1, show_default=True,
              help="Portfolio: PGD restarts crafted on the base model.")
@click.option("--square-queries", type=click.IntRange(min=0), default=0, show_default=True,
              help="Portfolio: Square attack query budget (0 = no Square).")
@click.option("--cascade/--no-cascade", default=True, show_default=True,
              help="Portfolio: each attack only tries images still robust (as AutoAttack).")
@click.option("--transforms", type=CommaList(str, "transform", transform_choices),
              default=",".join(DEFAULT_TRANSFORMS), show_default=True,
              help="'original' (the base model) and ensemble transforms, comma-separated.")
@click.option("--num-members", type=CommaList(_int_item(1), "num-members"), default="200",
              show_default=True, help="Ensemble size(s) G; a list sweeps them.")
@click.option("--ensemble-eps", type=CommaList(_nonneg_float, "ensemble eps"), default="10",
              show_default=True,
              help="Ensemble radius ε: members use g = exp(ε·T), T_ij ~ N(0, 1/h) (the paper's "
                   "notebook; its text writes g = I + εM); a list sweeps them.")
@click.option("--aggregate", type=click.Choice(["vote", "mean", "logit_mean"]), default="vote",
              show_default=True, help="How ensemble accuracy is counted (vote = paper's mode).")
@click.option("--attack-aggregate", type=click.Choice(["mean", "logit_mean"]), default=None,
              help="Differentiable output adaptive attacks use [default: --aggregate if "
                   "differentiable, else mean].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the subset, calibration, ensembles and attack random starts.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Device (cuda picks LOCAL_RANK's GPU under torchrun).")
@click.option("--batch-size", type=click.IntRange(min=1), default=250, show_default=True,
              help="Images per attack batch.")
@click.option("--eot-iter", type=click.IntRange(min=1), default=DEFAULT_EOT_ITER,
              show_default=True, help="EOT samples per gradient on stochastic ensembles.")
@click.option("--resample-members", is_flag=True,
              help="Ensembles redraw members on every forward (stochastic; attacked with EOT).")
@click.option("--samples-per-member", type=click.IntRange(min=1), default=None,
              help="Calibration images per member [default: 2h, twice the hidden width; the "
                   "paper used h].")
@click.option("--calibration-noise", type=click.FloatRange(min=0), default=None,
              help="Std of Gaussian noise added to the calibration pre-activations before π is "
                   "solved (the authors' notebook: 1e-4) [default: 0].")
@click.option("--sanity/--no-sanity", default=True, show_default=True,
              help="Run the sanity probes (PGD at eps 64/255; clean and FGSM references).")
@click.option("--figures/--no-figures", default=True, show_default=True,
              help="Write accuracy_vs_eps.png (and delta_heatmap.png for sweeps).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: runs/attack-<timestamp>].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(checkpoint: str, data: Path | None, figures: bool, out: Path | None, quiet: bool,
            device: str, attacks: list[str] | None, threats: list[str] | None, **options: Any
            ) -> None:
    """Attack the base model and its symmetry ensembles; print and save accuracy tables.

    By default every radius runs the attack portfolio: an image counts as robust only if it
    survives PGD and FGSM transferred from the base model, then APGD-CE, APGD-DLR and APGD on a
    soft-vote surrogate on each target's own output (a cascade: each attack only tries the
    images still robust). `--protocol paper` runs the paper's transfer-FGSM grid
    (Figure 11) with `transfer` and `adaptive` threat models. Writes results.json,
    results.csv, table.md and figures to --out.

    \b
    Examples:
      symensemble attack --data ~/cifar10
      symensemble attack --eps 8/255 --restarts 2 --square-queries 1000
      symensemble attack --protocol paper --attack pgd --eps 8/255 --steps 1,2,5,10
      symensemble attack --protocol autoattack --transforms original,group --n 1000
      torchrun --nproc_per_node 2 --no-python -- symensemble attack --n 1000
    """
    config = _build_config(attack=attacks, threat=threats, device=resolve_device(device),
                           **options)
    run_and_report(config, checkpoint, data, out, figures=figures, quiet=quiet)
