"""``symensemble train``: train a CIFAR-10 model from a TOML recipe."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..checkpoint import CheckpointError, prepare_output, read_checkpoint
from ..data import SplitSizeError
from ..training.adversarial import ADVERSARIAL_METHODS
from ..training.recipe import Recipe, load_recipe
from ..vocab import parse_eps
from . import options as opt


def _first_q_total(log_path: Path) -> float | None:
    """The Q total of the first epoch recorded in an interrupted run's log, to continue its drift."""
    try:
        epochs = json.loads(log_path.read_text())["epochs"]
    except (OSError, ValueError, KeyError):
        return None
    return next((e["q"]["total"] for e in epochs if isinstance(e.get("q"), dict)), None)


def _interrupted_hint(out: Path, saved: bool) -> str:
    """What Ctrl-C left behind: the epoch saved at ``out`` and how to continue from it."""
    try:
        if not saved:
            raise CheckpointError("no epoch of this run finished")
        _, info = read_checkpoint(out)
    except CheckpointError:
        return f"Interrupted before the first epoch finished; this run saved nothing at {out}."
    if info["extra"].get("complete"):
        return f"Interrupted; {out} holds a finished run of {info['epoch']} epochs."
    return (f"Interrupted; {out} holds the last finished epoch ({info['epoch']}). Run the same command "
            "with --resume to continue from there.")


class _Radius(click.ParamType):
    """A radius in [0, 1] pixel units, as a number or a fraction such as 8/255."""

    name = "radius"

    def convert(self, value, param, ctx):
        try:
            return parse_eps(value, "value", bounded=False)
        except ValueError as err:
            self.fail(str(err), param, ctx)


@click.command("train", short_help="Train a CIFAR-10 model from a recipe.")
@click.option("--recipe", "recipe_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="TOML recipe (see recipes/).")
@opt.data_option("CIFAR-10 source: class-folder tree, .tar.gz, or torchvision root "
                 "[default: $SYMENSEMBLE_DATA or ~/.cache/symensemble].")
@click.option("--download", is_flag=True, help="Let torchvision download CIFAR-10 into --data.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the recipe's epochs.")
@opt.seed_option(None, "Override the recipe's seed.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Override the learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Override the batch size.")
@click.option("--adv-method", type=click.Choice(ADVERSARIAL_METHODS), default=None,
              help="Override [adversarial] method: adversarial training with FGSM-RS or PGD, or none.")
@click.option("--adv-eps", type=_Radius(), default=None,
              help="Override [adversarial] eps, the L-inf radius in [0, 1] units (e.g. 8/255).")
@click.option("--adv-alpha", type=_Radius(), default=None,
              help="Override [adversarial] alpha, the attack step size (e.g. 10/255).")
@click.option("--adv-steps", type=click.IntRange(min=1), default=None,
              help="Override [adversarial] steps (PGD training).")
@opt.device_option("auto", "Training device.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Checkpoint path (.safetensors) [default: runs/<model>-<act>-h<h>-seed<s>.safetensors].")
@click.option("--resume", is_flag=True, help="Continue the interrupted run at --out.")
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint at --out.")
@click.option("--record-q", is_flag=True, help="Record the head's conserved quantities Q every epoch.")
@opt.quiet_option()
@opt.cli_errors(checkpoint="--out")  # library errors → exit 2 (the checkpoint of a run is --out)
def command(recipe_path: Path, data: Path | None, download: bool, epochs: int | None, seed: int | None,
            lr: float | None, batch_size: int | None, adv_method: str | None, adv_eps: float | None,
            adv_alpha: float | None, adv_steps: int | None, device: str, out: Path | None, resume: bool,
            overwrite: bool, record_q: bool, quiet: bool) -> None:
    """Train the model described by --recipe; options override recipe values.

    The checkpoint is written atomically after every epoch, metrics to <out>.log.json. An
    existing --out is refused unless --resume or --overwrite is given. Adversarial runs also
    keep the epoch with the best PGD validation accuracy in <out>.best.safetensors. Under
    torchrun it trains data-parallel; only rank 0 prints and writes.
    """
    from ..distributed import distributed, is_main_process
    from ..training.loop import DivergenceError, train
    from ..training.state import default_out

    recipe = _recipe_with_overrides(recipe_path, epochs, seed, lr, batch_size, adv_method, adv_eps,
                                    adv_alpha, adv_steps)
    out = out or default_out(recipe)
    try:  # before any training: an existing or unwritable --out would lose the work
        prepare_output(out, resume=resume, overwrite=overwrite)
    except CheckpointError as err:
        raise click.BadParameter(str(err), param_hint="--out") from None
    finished: list[int] = []  # epochs this invocation finished, for the Ctrl-C hint
    callbacks = _callbacks(recipe.epochs, out, resume, record_q, quiet, finished)
    dev = opt.resolve_device(device)
    try:
        with distributed(dev):  # a process group under torchrun; a no-op in a single process
            result = train(recipe, data=data, out=out, device=dev, resume=resume,
                           download=download, callbacks=callbacks, progress=not quiet)
            main = is_main_process()
    except KeyboardInterrupt:
        if is_main_process():
            click.echo(_interrupted_hint(out, bool(finished) or resume), err=True)
        raise click.Abort() from None
    except SplitSizeError as err:  # the rest of the library's errors: opt.cli_errors
        raise click.UsageError(f"recipe {recipe_path}: {err}") from None
    except DivergenceError as err:
        raise click.ClickException(str(err)) from None
    if main:
        _summary(result)


def _recipe_with_overrides(recipe_path: Path, epochs: int | None, seed: int | None, lr: float | None,
                           batch_size: int | None, adv_method: str | None, adv_eps: float | None,
                           adv_alpha: float | None, adv_steps: int | None) -> Recipe:
    """The recipe with the command-line overrides applied (exit 2 on a bad value).

    --adv-eps/--adv-alpha/--adv-steps only tune adversarial training; on a recipe that trains
    without it (no [adversarial] table, or method = "none") and without --adv-method they would
    silently do nothing, so they are refused.
    """
    try:
        recipe = load_recipe(recipe_path)
        adversarial = recipe.adversarial.replace(method=adv_method, eps=adv_eps, alpha=adv_alpha,
                                                 steps=adv_steps)
        recipe = recipe.replace(epochs=epochs, seed=seed, lr=lr, batch_size=batch_size,
                                adversarial=adversarial)
    except ValueError as err:  # RecipeError, or an [adversarial] override out of range
        raise click.BadParameter(str(err), param_hint="--recipe") from None
    given = [name for name, value in (("--adv-eps", adv_eps), ("--adv-alpha", adv_alpha),
                                      ("--adv-steps", adv_steps)) if value is not None]
    if given and not recipe.adversarial.enabled:
        raise click.UsageError(
            f"{'/'.join(given)} tune adversarial training, but recipe {recipe_path} trains without it "
            f"(adversarial method = {recipe.adversarial.method!r}"
            f"{'' if adv_method else ': the recipe has no [adversarial] table or sets method = none'}); "
            "add --adv-method fgsm_rs or --adv-method pgd to train adversarially, or drop "
            f"{'/'.join(given)}"
        )
    return recipe


def _callbacks(epochs: int, out: Path, resume: bool, record_q: bool, quiet: bool, finished: list[int]
               ) -> list[Callable[..., None]]:
    """Q recording (--record-q), the finished-epoch count for the Ctrl-C hint, one line per epoch."""
    from ..distributed import is_main_process
    from ..training.metrics import format_metrics
    from ..training.state import log_path_for

    callbacks: list[Callable[..., None]] = []
    if record_q:
        from ..diagnostics import QRecorder

        callbacks.append(QRecorder(baseline=_first_q_total(log_path_for(out)) if resume else None))
    callbacks.append(lambda model, epoch, metrics: finished.append(epoch + 1))
    if not quiet:
        def echo(model, epoch, metrics):  # one line per epoch, from rank 0 only under torchrun
            if is_main_process():
                click.echo(f"epoch {epoch + 1}/{epochs}  {format_metrics(metrics)}", err=True)

        callbacks.append(echo)
    return callbacks


def _summary(result: Any) -> None:
    """The closing lines: files written, and the accuracies of the weights in the checkpoint.

    After a catastrophic-overfitting stop those are the restored epoch's, not the collapsed one's.
    """
    from ..training.state import best_path_for

    click.echo(f"checkpoint: {result.checkpoint}")
    click.echo(f"metrics:    {result.log_path}")
    kept = result.metrics
    if kept:
        note = f"  ({kept['early_stop']})" if "early_stop" in kept else ""
        click.echo(f"test accuracy {kept['test_accuracy']:.4f}  "
                   f"val accuracy {kept['val_accuracy']:.4f}{note}")
    robust = [e for e in result.history if "val_pgd_accuracy" in e]
    if robust:
        best = max(robust, key=lambda e: e["val_pgd_accuracy"])
        click.echo(f"best robust validation accuracy {best['val_pgd_accuracy']:.4f} at epoch "
                   f"{best['epoch']}: {best_path_for(result.checkpoint)}")
