"""``symensemble q ...``: conserved-quantity diagnostics (paper §5, App. E–H) and teleportation.

Every subcommand writes ``<name>.json`` (results, the paper's claim checks, settings, versions,
git revision, command line) and ``<name>.png`` (the figure) into ``--out`` (default
``runs/q-<subcommand>-<timestamp>``) and prints a short summary. The work is done by
:mod:`symensemble.diagnostics`; this module only parses options.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import options as opt

_POINTWISE = ("identity", "relu", "leaky_relu", "tanh", "sigmoid")
_positive = click.FloatRange(min=0, min_open=True)


def _config(text: str) -> tuple[int, int, int, str]:
    from ..diagnostics.distribution import parse_config  # lazy: keeps `symensemble --help` fast

    return parse_config(text)


def _out(command: str) -> Callable:
    """``--out`` (default ``runs/q-<command>-<timestamp>``) and ``--overwrite``."""

    def decorate(fn: Callable) -> Callable:
        return opt.out_dir_option(f"runs/q-{command}-<timestamp>")(opt.overwrite_option()(fn))

    return decorate


def _activations(default: tuple[str, ...], help: str = "Hidden activation(s).") -> Callable:
    return opt.list_option("--activation", "activations", item=opt.one_of(_POINTWISE), what="activation",
                           default=default, help=help)


def _run_study(command: str, name: str, out: Path | None, settings: dict[str, Any],
               compute: Callable[[], dict[str, Any]], plot: Callable, lines: Callable,
               q_definition: str | None = None, overwrite: bool = False) -> None:
    """Check the output folder, run a study, write its JSON (with the ``q_definition`` it
    used) and figure, print its summary.

    The folder follows :func:`symensemble.io.check_out_dir` (checked before the work; a
    non-empty one only with ``overwrite``) and is written whole by
    :func:`symensemble.io.staged_dir`; library errors become usage errors.
    """
    from ..diagnostics.common import run_header, write_result
    from ..io import check_out_dir, default_run_dir, staged_dir

    with opt.cli_errors():
        folder = check_out_dir(out or default_run_dir(f"q-{command}"), overwrite=overwrite)
        result = compute()
    if q_definition is not None:
        result["q_definition"] = q_definition
    header = run_header(f"symensemble q {command}", settings)
    with staged_dir(folder) as tmp:
        json_tmp, png_tmp = write_result(tmp / f"{name}.json", header, result, plot)
    json_path = folder / json_tmp.name
    png_path = folder / png_tmp.name if png_tmp is not None else None
    for line in lines(result):
        click.echo(line)
    click.echo(f"wrote {json_path} and {png_path}")


@click.group("q", short_help="Conserved quantities Q: inspect, dynamics, ..., teleport.")
def command() -> None:
    """Conserved quantities of gradient flow (paper §5, App. E-H) and orbit teleportation."""


@command.command("inspect", short_help="Q of every hidden layer of a trained model.")
@click.argument("checkpoint")
@_out("inspect")
def inspect_cmd(checkpoint: str, out: Path | None, overwrite: bool) -> None:
    """Report the head's conserved quantities Q_k = |V_k|^2 + b_k^2 - alpha |U_k|^2 per hidden
    unit (or the full imbalance matrix of a linear head), its symmetry group and orbit dimension.

    CHECKPOINT is a .safetensors file or a shipped name such as paper_cnn.
    """
    from ..checkpoint import load_model
    from ..diagnostics.inspection import inspect_model, plot_inspection
    from ..diagnostics.summary import inspect_lines

    with opt.cli_errors(checkpoint="CHECKPOINT"):
        model, info = load_model(checkpoint, with_info=True)
    stem = Path(checkpoint).name.removesuffix(".safetensors") or "model"
    _run_study("inspect", stem, out, {"checkpoint": checkpoint},
               lambda: {**inspect_model(model), "checkpoint": info["path"]},
               lambda r, p: plot_inspection(r, p, title=stem), inspect_lines, overwrite=overwrite)


@command.command("dynamics", short_help="Fig. 3: Q under gradient descent; Prop. E.1 bound.")
@_activations(("identity", "relu", "sigmoid", "tanh"))
@opt.list_option("--lr", "lrs", item=opt.number(positive=True), what="learning rate",
                 default=(0.1, 0.01, 0.001), help="Learning rate(s).")
@click.option("--steps", type=click.IntRange(min=1), default=100_000, show_default=True,
        help="Gradient-descent steps (the paper: 400000).")
@opt.widths_options(m=5, h=50, n=10)
@click.option("--init-std", type=_positive, default=0.1, show_default=True,
              help="Std of the initial U, V entries.")
@opt.seed_option()
@_out("dynamics")
@opt.quiet_option()
def dynamics_cmd(activations, lrs, steps, m, h, n, init_std, seed, out, overwrite, quiet) -> None:
    """Train W = U sigma(V) (whitened input) with several learning rates and record
    dQ~(t) (eq. 42) and the loss; check |Q_{t+1} - Q_t| <= lr^2 |dL/dt| (Prop. E.1) at every
    step of the linear network."""
    from ..diagnostics.dynamics import plot_q_dynamics, q_dynamics
    from ..diagnostics.summary import dynamics_lines

    kw = dict(steps=steps, m=m, h=h, n=n, init_std=init_std, seed=seed)
    _run_study("dynamics", "dynamics", out, dict(activations=activations, lrs=lrs, **kw),
               lambda: q_dynamics(activations, lrs, progress=not quiet, **kw), plot_q_dynamics,
               dynamics_lines, "eq. 47: Q = 1/2 Tr U^T U - sum int_0^V sigma/sigma'", overwrite)


@command.command("distribution", short_help="Figs. 4-5: Q at initialization vs E[Q] = m - h.")
@click.option("--config", "configs", type=opt.Item(_config, "m,h,n,act"), multiple=True, default=None,
              help="m,h,n,activation to sample (repeat the option for several) [default: the paper's "
              "Figs. 4-5: 100,100,100 / 100,200,100 / 200,100,100 identity; 100,100,100 relu, tanh, "
              "sigmoid].")
@opt.list_option("--init", "inits", item=opt.one_of(("xavier", "glorot", "kaiming")), what="initialization",
                 default=("xavier", "kaiming"),
                 help="Initialization(s); xavier = the paper's N(0, 1/fan_in).")
@click.option("--samples", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Initializations per configuration.")
@opt.seed_option()
@_out("distribution")
@opt.quiet_option()
def distribution_cmd(configs, inits, samples, seed, out, overwrite, quiet) -> None:
    """Sample Q = Tr U^T U - 2 sum int_0^V sigma/sigma' (= Tr[U^T U - V V^T] for sigma = id)
    over initializations and compare the mean with E[Q] (eq. 46; quadrature for nonlinear sigma)."""
    from ..diagnostics.distribution import DEFAULT_CONFIGS, plot_q_distribution, q_distribution
    from ..diagnostics.summary import distribution_lines

    configs = list(configs) or list(DEFAULT_CONFIGS)
    settings = dict(configs=configs, inits=inits, samples=samples, seed=seed)
    _run_study("distribution", "distribution", out, settings,
               lambda: q_distribution(configs, inits, samples=samples, seed=seed, progress=not quiet),
               plot_q_distribution, distribution_lines,
               "2 x eq. 47: Q = Tr U^T U - 2 sum int_0^V sigma/sigma' (eq. 46 scale)", overwrite)


@command.command("convergence", short_help="Figs. 6-7: loss curves from inits with chosen Q.")
@click.option("--kind", type=click.Choice(["elementwise", "radial"]), default="radial", show_default=True,
              help="Fig. 6 (W = U sigma(V)) or Fig. 7 / Prop. G.2 (radial).")
@_activations(("identity", "relu", "tanh", "sigmoid"), "Activations for --kind elementwise.")
@opt.list_option("--target", "targets", item=opt.number(positive=False), what="target Q",
                 help="Initial Q to reach exactly [default: -10,-2,0,2,10 elementwise; 0.25,0.5,1,2 radial].")
@click.option("--lr", type=_positive, default=None,
              help="Learning rate [default: 0.01 elementwise (mean loss), 1e-5 radial].")
@click.option("--steps", type=click.IntRange(min=1), default=None,
        help="Gradient-descent steps [default: 20000 elementwise, 100000 radial].")
@click.option("--threshold", type=_positive, default=None,
              help="Converged when L <= threshold * L(0) [default: 1e-4 elementwise, 1e-6 radial].")
@opt.seed_option()
@_out("convergence")
@opt.quiet_option()
def convergence_cmd(kind, activations, targets, lr, steps, threshold, seed, out, overwrite, quiet) -> None:
    """Move one initialization along its symmetry orbit to each target Q (same function, same
    initial loss) and train by gradient descent; report the steps to converge per Q."""
    from ..diagnostics.convergence import convergence_elementwise, convergence_radial, plot_convergence
    from ..diagnostics.summary import convergence_lines

    given = {"targets": None if targets is None else tuple(targets), "lr": lr, "steps": steps,
             "threshold": threshold}
    kw: dict[str, Any] = {"seed": seed, **{k: v for k, v in given.items() if v is not None}}
    settings = {"kind": kind, **({"activations": activations} if kind == "elementwise" else {}), **kw}
    radial = kind == "radial"
    _run_study("convergence", f"convergence-{kind}", out, settings,
               lambda: convergence_radial(progress=not quiet, **kw) if radial
               else convergence_elementwise(activations, progress=not quiet, **kw),
               plot_convergence, convergence_lines,
               "radial: Q = sum_i lambda_i = Tr[U^T U + V^T V] (eqs. 70-71)" if radial else "eq. 47",
               overwrite)


@command.command("hessian", short_help="Fig. 9: Hessian spectra at minima vs Q; orbit dimension.")
@_activations(("identity", "relu", "tanh", "sigmoid"))
@opt.list_option("--init-std", "init_stds", item=opt.number(positive=True), what="init std",
                 default=(0.001, 0.3, 0.6, 0.9), help="Std(s) of the initial entries, which set Q.")
@opt.widths_options(m=10, h=50, n=5)
@click.option("--lr", type=_positive, default=0.1, show_default=True,
              help="Learning rate (mean squared error, as the paper's code).")
@click.option("--steps", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Gradient-descent steps.")
@click.option("--method", type=click.Choice(["auto", "full", "lanczos"]), default="auto", show_default=True,
              help="Dense Hessian (all eigenvalues) or Lanczos (top ones).")
@click.option("--zero-tol", type=_positive, default=1e-3, show_default=True,
              help="|eigenvalue| <= zero-tol counts as zero.")
@opt.seed_option()
@_out("hessian")
@opt.quiet_option()
def hessian_cmd(activations, init_stds, m, h, n, lr, steps, method, zero_tol, seed, out, overwrite,
                quiet) -> None:
    """Train W = U sigma(V) from inits with different Q, take the Hessian of ||Y - W||^2 at the
    end, and count the near-zero eigenvalues against the symmetry orbit dimension (Prop. C.3);
    also check eq. 83 on the one-dimensional example."""
    from ..diagnostics.hessian import hessian_study, plot_hessian
    from ..diagnostics.summary import hessian_lines

    kw = dict(m=m, h=h, n=n, lr=lr, steps=steps, method=method, zero_tol=zero_tol, seed=seed)
    _run_study("hessian", "hessian", out, dict(activations=activations, init_stds=init_stds, **kw),
               lambda: hessian_study(activations, init_stds, progress=not quiet, **kw), plot_hessian,
               hessian_lines, "eq. 47 at initialization", overwrite)


@command.command("teleport", short_help="Move a model along its orbit to a chosen Q or flatness.")
@click.argument("checkpoint")
@click.option("--target", type=float, default=None, help="Target total Q = sum_k Q_k of the head.")
@opt.list_option("--unit-targets", "unit_targets", item=opt.number(), what="target", unique=False,
                 help="Target Q_k per hidden unit (h numbers).")
@click.option("--flattest", type=click.Choice(["trace", "top"]), default=None,
              help="Go to the orbit point with the smallest head Hessian trace (exact) or top "
              "eigenvalue (Lanczos + pattern search) on training data.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="New checkpoint (.safetensors) [default: runs/q-teleport-<timestamp>/<name>-<mode>"
              ".safetensors]; JSON and PNG are written next to it.")
@opt.data_option()
@click.option("--eval/--no-eval", "do_eval", default=True, show_default=True,
              help="Measure test loss and accuracy before and after (needs the data).")
@click.option("--samples", type=click.IntRange(min=16), default=512, show_default=True,
              help="Training images whose features define the Hessian for --flattest.")
@click.option("--max-evals", type=click.IntRange(min=2), default=40, show_default=True,
              help="Top-eigenvalue evaluations of the --flattest top search.")
@click.option("--lanczos-iters", type=click.IntRange(min=2), default=20, show_default=True,
              help="Lanczos iterations per top-eigenvalue evaluation.")
@click.option("--tol", type=click.FloatRange(min=0), default=1e-5, show_default=True,
              help="Largest relative change of test loss/accuracy accepted.")
@opt.seed_option()
@opt.quiet_option()
def teleport_cmd(checkpoint, target, unit_targets, flattest, out, data, do_eval, samples, max_evals,
                 lanczos_iters, tol, seed, quiet) -> None:
    """Apply g = diag(c) to the head (V_k -> c_k V_k, b_k -> c_k b_k, U_k -> c_k^-alpha U_k):
    the network function is unchanged while Q moves exactly to --target / --unit-targets, or to
    the flattest point found (--flattest). Writes a new checkpoint.

    CHECKPOINT is a .safetensors file or a shipped name such as paper_cnn.
    """
    from ..data import DataError
    from ..diagnostics.summary import teleport_lines
    from ..diagnostics.teleport_run import teleport_checkpoint
    from ..io import check_out_file

    with opt.cli_errors(checkpoint="CHECKPOINT"):
        if out is not None:  # before the search: an unwritable --out would lose the work
            check_out_file(out)
        try:
            run = teleport_checkpoint(checkpoint, out, total=target, per_unit=unit_targets,
                                      flattest=flattest, data=data, evaluate=do_eval, samples=samples,
                                      max_evals=max_evals, lanczos_iters=lanczos_iters, tol=tol,
                                      seed=seed, progress=not quiet)
        except DataError as err:
            hint = f"{err} (use --no-eval to skip the evaluation)"
            raise click.BadParameter(hint, param_hint="--data") from None
    for line in teleport_lines(run.report):
        click.echo(line)
    click.echo(f"wrote {run.checkpoint}, {run.json_path} and {run.png_path}")
    if not run.function_unchanged:
        raise click.ClickException(
            f"test loss/accuracy changed by more than --tol {tol:g}: see {run.json_path}"
        )
