"""``symensemble attack``: robustness of a model and its symmetry ensembles (transfer, adaptive)."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..attacks import DEFAULT_EOT_ITER, list_attacks
from ..records import DEFAULT_TRANSFORMS, PAPER_FGSM_EPS, THREATS, parse_eps, transform_choices

__all__ = ["command", "CommaList", "run_evaluation", "evaluate_or_fail", "resolve_device",
           "write_or_fail"]


class CommaList(click.ParamType):
    """A comma-separated list, each item converted by ``convert_item`` (errors name the item)."""

    name = "list"

    def __init__(self, convert_item: Callable[[str], Any], what: str,
                 choices: Callable[[], list[str]] | None = None) -> None:
        self.convert_item = convert_item
        self.what = what
        self.choices = choices

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
                out.append(self.convert_item(item) if not isinstance(item, (int, float))
                           else item)
            except ValueError as err:
                self.fail(str(err), param, ctx)
        return list(dict.fromkeys(out))


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
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cuda`` must be available.

    Raises:
        click.BadParameter: ``cuda`` asked for but torch sees no CUDA device (``param_hint``
            names where the value came from).
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter(
            f"{device!r} was asked for but torch sees no CUDA device on this machine "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
            "expected 'cpu' or 'auto'", param_hint=param_hint)
    return device


def evaluate_or_fail(settings: dict[str, Any], *, quiet: bool, context: str = ""):
    """:func:`symensemble.evaluate` with library errors turned into click errors.

    A bad checkpoint names ``--checkpoint``, bad data ``--data``; any other ``ValueError`` is
    a usage error (prefixed with ``context``, e.g. the recipe path). Other exceptions are
    bugs and propagate unchanged.
    """
    from ..checkpoint import CheckpointError
    from ..data import DataError
    from ..evaluation import evaluate

    try:
        return evaluate(**settings, progress=not quiet)
    except CheckpointError as err:
        raise click.BadParameter(str(err), param_hint="--checkpoint") from None
    except DataError as err:
        raise click.BadParameter(str(err), param_hint="--data") from None
    except ValueError as err:
        raise click.UsageError(f"{context}{err}") from None


def write_or_fail(result: Any, out: Path, *, figures: bool) -> dict[str, Path]:
    """:func:`symensemble.report.write_results`, with an unwritable ``out`` a click error.

    Raises:
        click.BadParameter: ``out`` cannot be created or written (names ``--out``).
    """
    from ..report import write_results

    try:
        return write_results(result, out, figures=figures)
    except OSError as err:
        raise click.BadParameter(
            f"cannot write the results to {str(out)!r}: {err.strerror or err}; expected a "
            "folder that can be created and written", param_hint="--out") from None


def run_evaluation(settings: dict[str, Any], out: Path | None, *, figures: bool, quiet: bool
                   ) -> None:
    """Run :func:`symensemble.evaluate` with ``settings``, print the table, write ``out``.

    Library errors become click errors naming the option at fault. Only rank 0 prints and
    writes under ``torchrun``.
    """
    from ..distributed import is_main_process, shutdown
    from ..report import markdown_table, warnings_text

    try:
        result = evaluate_or_fail(settings, quiet=quiet)
        if not is_main_process():
            return
    finally:
        shutdown()
    result.settings["command"] = " ".join(shlex.quote(a) for a in ["symensemble", *sys.argv[1:]])
    if out is None:
        out = Path("runs") / f"attack-{time.strftime('%Y%m%d-%H%M%S')}"
    written = write_or_fail(result, out, figures=figures)
    click.echo("")
    click.echo(markdown_table(result))
    click.echo(warnings_text(result))
    click.echo(f"elapsed {result.settings['elapsed_s']:.1f} s; wrote "
               + ", ".join(p.name for p in written.values()) + f" to {out}")


@click.command("attack", short_help="Robust accuracy of a model and its symmetry ensembles.")
@click.option("--checkpoint", default="paper_cnn", show_default=True,
              help="Checkpoint .safetensors path or shipped name.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="CIFAR-10 source: class-folder tree, .tar.gz, or torchvision root "
                   "[default: $SYMENSEMBLE_DATA or ~/.cache/symensemble].")
@click.option("--n", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Test images (seeded, stratified by class).")
@click.option("--attack", "attacks", type=CommaList(str, "attack", list_attacks), default="fgsm",
              show_default=True, help=f"Attack(s), comma-separated: {', '.join(list_attacks())}.")
@click.option("--eps", "eps", type=CommaList(parse_eps, "eps"),
              default=",".join(f"{e:g}" for e in PAPER_FGSM_EPS), show_default=True,
              help="L∞ radii in [0, 1] pixel units, comma-separated; fractions like 8/255 work.")
@click.option("--steps", type=CommaList(_int_item(0), "steps"), default=None,
              help="Iterations of iterative attacks, comma-separated (a grid; 0 = clean) "
                   "[default: 10 for pgd, apgd, eotpgd].")
@click.option("--alpha", callback=_alpha, default=None,
              help="Step size in pixel units (e.g. 0.01 or 2/255) [default: 2.5·eps/steps].")
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
@click.option("--threat", "threats", type=CommaList(str, "threat", lambda: list(THREATS)),
              default=",".join(THREATS), show_default=True,
              help="transfer (crafted on the base model), adaptive (on each ensemble), or both.")
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
              help="Calibration images per member [default: hidden width h].")
@click.option("--sanity/--no-sanity", default=True, show_default=True,
              help="Run the sanity probes (PGD at eps 64/255; FGSM references).")
@click.option("--figures/--no-figures", default=True, show_default=True,
              help="Write accuracy_vs_eps.png (and delta_heatmap.png for sweeps).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: runs/attack-<timestamp>].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(checkpoint: str, data: Path | None, n: int, attacks: list[str], eps: list[float],
            steps: list[int] | None, alpha: float | None, transforms: list[str],
            num_members: list[int], ensemble_eps: list[float], aggregate: str,
            attack_aggregate: str | None, threats: list[str], seed: int, device: str,
            batch_size: int, eot_iter: int, resample_members: bool,
            samples_per_member: int | None, sanity: bool, figures: bool, out: Path | None,
            quiet: bool) -> None:
    """Attack the base model and its symmetry ensembles; print and save accuracy tables.

    Every strength is measured under two threat models: `transfer` (examples crafted once on
    the base model and shared by all ensembles — the paper's protocol) and `adaptive` (the
    attack run on each ensemble's own differentiable output, with EOT when members are
    resampled). The defaults reproduce the paper's FGSM grid (Figure 11) on the shipped
    checkpoint. Writes results.json, results.csv, table.md and figures to --out.

    \b
    Examples:
      symensemble attack --data ~/cifar10
      symensemble attack --attack pgd --eps 8/255 --steps 1,2,5,10 --transforms original,group
      symensemble attack --eps 0 --num-members 10,20,40 --ensemble-eps 20,10,1,0.1
      torchrun --nproc_per_node 2 --no-python -- symensemble attack --n 1000
    """
    settings = dict(
        model=checkpoint, data=data, n=n, attack=attacks, eps=eps, steps=steps, alpha=alpha,
        transforms=[t.lower() for t in transforms], num_members=num_members,
        ensemble_eps=ensemble_eps, aggregate=aggregate, attack_aggregate=attack_aggregate,
        threat=[t.lower() for t in threats],
        seed=seed, device=resolve_device(device), batch_size=batch_size, eot_iter=eot_iter,
        resample_members=resample_members, samples_per_member=samples_per_member, sanity=sanity,
    )
    run_evaluation(settings, out, figures=figures, quiet=quiet)
