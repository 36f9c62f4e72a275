"""``symensemble attack``: robust accuracy of a model and its symmetry ensembles."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..robustness.attacks import attack_click_options, list_attacks
from ..robustness.config import PROTOCOLS, EvalConfig
from ..robustness.records import transform_choices
from ..robustness.report.robustbench import ModelCard
from ..vocab import DEFAULT_TRANSFORMS, THREATS, parse_eps
from . import options as opt
from .options import CommaList, cli_errors, resolve_device

__all__ = ["command", "CommaList", "RunOutput", "run_and_report", "resolve_device"]


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


@dataclass(frozen=True)
class RunOutput:
    """Where and how a run is reported (the options that do not change what is measured).

    Attributes:
        out: the run's folder; ``None``: a fresh ``runs/<name>-<timestamp>``.
        figures: also write the PNG figures.
        quiet: no progress bar.
        overwrite: replace a non-empty ``out`` whole (else it is refused before any work).
        name: the default folder's prefix.
        card: RobustBench model-info fields only the user knows (``--model-name`` ...).
    """

    out: Path | None = None
    figures: bool = True
    quiet: bool = False
    overwrite: bool = False
    name: str = "attack"
    card: ModelCard = field(default_factory=ModelCard)


def _evaluate(config: EvalConfig, model: Any, data: Path | None, *, quiet: bool, context: str = ""):
    """:func:`symensemble.evaluate` inside the torchrun process group, errors as click errors
    (:func:`~symensemble.commands.options.cli_errors`, prefixed with ``context``). Returns
    ``None`` on ranks other than 0."""
    from ..distributed import distributed
    from ..robustness.evaluation import evaluate

    with cli_errors(context):
        with distributed(config.device) as info:
            result = evaluate(model, data, config, progress=not quiet)
            return result if info.is_main else None


def _print_report(result: Any, comparison: str, written: dict[str, Path], folder: Path) -> None:
    from ..robustness.report import markdown_table, portfolio_table, warnings_text

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
               + ", ".join(p.name for p in written.values()) + f" to {folder}")


def run_and_report(config: EvalConfig, model: Any, data: Path | None, output: RunOutput, *,
                   paper: dict[str, Any] | None = None, title: str | None = None,
                   context: str = "") -> None:
    """Check the output folder, evaluate, then (rank 0) print the tables and write the folder.

    Shared by ``attack`` and ``reproduce``. The folder is checked before any work (writable;
    empty unless ``output.overwrite``) and written whole at the end
    (:func:`symensemble.robustness.report.write_results`).

    Args:
        config: the :class:`~symensemble.robustness.config.EvalConfig` to run.
        model, data: checkpoint (name, path or a loaded module) and data source.
        output: where and how to report.
        paper: a recipe's ``[paper]`` table: also write and print comparison.md.
        title: the recipe's title (recorded in the settings and comparison.md).
        context: prefix of usage errors (the recipe path).
    """
    from ..io import check_out_dir, default_run_dir
    from ..robustness.report import compare_with_paper, write_results

    with cli_errors(context):
        folder = check_out_dir(output.out or default_run_dir(output.name),
                               overwrite=output.overwrite)
    result = _evaluate(config, model, data, quiet=output.quiet, context=context)
    if result is None:
        return
    result.settings["command"] = " ".join(shlex.quote(a) for a in ["symensemble", *sys.argv[1:]])
    if getattr(model, "model_spec", None):
        result.settings["model_spec"] = model.model_spec
    if title is not None:
        result.settings["recipe"] = {"path": context.rstrip(": "), "title": title}
    comparison = compare_with_paper(result, paper) if paper else ""
    extra = {"comparison.md": f"# {title}\n\n{comparison}"} if comparison else {}
    with cli_errors(context):
        written = write_results(result, folder, figures=output.figures, extra=extra,
                                overwrite=output.overwrite, card=output.card)
    _print_report(result, comparison, written, folder)


def _model(checkpoint: str, spec: str | None, weights: Path | None, num_classes: int | None,
           normalize: str | None, model_dir: Path | None) -> Any:
    """The model to attack: the ``--checkpoint`` name or path, or the ``--model`` classifier
    loaded by :func:`symensemble.models.foreign.load_foreign_model` (errors: exit code 2)."""
    extras = {"--weights": weights, "--num-classes": num_classes, "--normalize": normalize,
              "--model-dir": model_dir}
    if spec is None:
        given = [k for k, v in extras.items() if v is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply to --model SPEC; a "
                                   "--checkpoint carries its own weights and normalization")
        return checkpoint
    source = click.get_current_context().get_parameter_source("checkpoint")
    if source is click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--model and --checkpoint are mutually exclusive: give one")
    from ..models.foreign import load_foreign_model

    with cli_errors(checkpoint="--model"):
        return load_foreign_model(spec, weights=weights, num_classes=num_classes,
                                  normalize=normalize, model_dir=model_dir)


def _given(**values: Any) -> dict[str, Any]:
    """The options the user set (``None`` leaves the config's default, resolved by protocol)."""
    return {k: v for k, v in values.items() if v is not None}


def _with_clean(protocol: str | None, eps: list[float] | None) -> list[float] | None:
    """AutoAttack radii with 0 added: RobustBench's model info needs the clean accuracy, so an
    eps list without 0 still measures it (and says so)."""
    if protocol == "autoattack" and eps is not None and 0.0 not in eps:
        click.echo("note: eps 0 (clean accuracy) added: RobustBench's model-info files need it",
                   err=True)
        return [0.0, *eps]
    return eps


@click.command("attack", short_help="Robust accuracy of a model and its symmetry ensembles.")
@click.option("--checkpoint", default="paper_cnn", show_default=True,
              help="Checkpoint .safetensors path or shipped name.")
@opt.model_spec_options
@opt.data_option("CIFAR-10 source: class-folder tree, .tar.gz, or torchvision root "
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
              default=None, help=f"Paper grid: attack(s), comma-separated: {', '.join(list_attacks('grid'))} "
                   "[default: fgsm].")
@click.option("--steps", type=CommaList(_int_item(0), "steps"), default=None,
              help="Paper grid: iterations of iterative attacks, comma-separated (0 = clean) "
                   "[default: 10 for pgd, apgd, eotpgd].")
@click.option("--alpha", callback=_alpha, default=None,
              help="Paper grid: step size in pixel units (e.g. 2/255) [default: 2.5·eps/steps].")
@click.option("--threat", "threats", type=CommaList(str, "threat", lambda: list(THREATS)),
              default=None, help="Paper grid: transfer (crafted on the base model), adaptive "
                                 "(on each ensemble), or both [default: both].")
@attack_click_options()
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
@opt.seed_option(0, "Seeds the subset, calibration, ensembles and attack random starts.")
@opt.device_option("auto", "Device (cuda picks LOCAL_RANK's GPU under torchrun).")
@click.option("--batch-size", type=click.IntRange(min=1), default=250, show_default=True,
              help="Images per attack batch.")
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
@opt.out_dir_option("runs/attack-<timestamp>")
@opt.overwrite_option()
@opt.model_card_options
@opt.quiet_option("No progress bar.")
def command(checkpoint: str, model: str | None, weights: Path | None, num_classes: int | None,
            normalize: str | None, model_dir: Path | None, data: Path | None,
            protocol: str | None, n: int | None,
            eps: list[float] | None, attacks: list[str] | None, steps: list[int] | None,
            alpha: float | None, threats: list[str] | None, transforms: list[str],
            num_members: list[int], ensemble_eps: list[float], aggregate: str,
            attack_aggregate: str | None, seed: int, device: str, batch_size: int,
            resample_members: bool, samples_per_member: int | None,
            calibration_noise: float | None, sanity: bool, figures: bool, out: Path | None,
            overwrite: bool, model_name: str | None, link: str | None, authors: str | None,
            venue: str | None, quiet: bool, **attack_options: Any) -> None:
    """Attack the base model and its symmetry ensembles; print and save accuracy tables.

    By default every radius runs the attack portfolio: an image counts as robust only if it
    survives PGD and FGSM transferred from the base model, then APGD-CE, APGD-DLR, APGD-T and
    APGD (and APGD-T) on a soft-vote surrogate on each target's own output (a cascade: each
    attack only tries the images still robust; with --sanity the binarization test checks the
    attack can find adversarial examples that surely exist). `--protocol paper` runs the
    paper's transfer-FGSM grid (Figure 11) with `transfer` and `adaptive` threat models. Writes results.json,
    results.csv, table.md and figures to --out (refused when it holds files, unless
    --overwrite); `--protocol autoattack` adds RobustBench's model_info/cifar10/Linf/<Name>.json.

    \b
    Examples:
      symensemble attack --data ~/cifar10
      symensemble attack --eps 8/255 --restarts 2 --square-queries 1000
      symensemble attack --protocol paper --attack pgd --eps 8/255 --steps 1,2,5,10
      symensemble attack --protocol autoattack --transforms original,group --n 1000
      torchrun --nproc_per_node 2 --no-python -- symensemble attack --n 1000
    """
    with cli_errors():  # attack_options: the registry's options, keyed by EvalConfig field
        config = EvalConfig(**attack_options, **_given(
            protocol=protocol, n=n, eps=_with_clean(protocol, eps), attack=attacks, steps=steps,
            alpha=alpha, threat=threats, transforms=transforms, num_members=num_members,
            ensemble_eps=ensemble_eps, aggregate=aggregate, attack_aggregate=attack_aggregate,
            seed=seed, device=resolve_device(device), batch_size=batch_size,
            resample_members=resample_members, samples_per_member=samples_per_member,
            calibration_noise=calibration_noise, sanity=sanity))
    target = _model(checkpoint, model, weights, num_classes, normalize, model_dir)
    card = ModelCard(name=model_name, link=link, authors=authors, venue=venue)
    output = RunOutput(out, figures=figures, quiet=quiet, overwrite=overwrite, card=card)
    run_and_report(config, target, data, output)
