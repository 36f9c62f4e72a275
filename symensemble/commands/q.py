"""``symensemble q ...``: conserved-quantity diagnostics (paper §5, App. E–H) and teleportation.

Every subcommand writes ``<name>.json`` (results, the paper's claim checks, settings, versions,
git revision) and ``<name>.png`` (the figure) into ``--out`` and prints a short summary.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from ..checkpoint import CheckpointError

DEFAULT_OUT = Path("results/q")


def _fail(err: Exception) -> click.UsageError:
    return click.UsageError(str(err))


def _write(
    out: Path, name: str, command: str, settings: dict[str, Any], result: dict[str, Any], plot
) -> tuple[Path, Path]:
    from ..diagnostics.common import run_header, write_json

    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    write_json(json_path, {**run_header(f"symensemble q {command}", settings), **result})
    plot(result, png_path)
    return json_path, png_path


def _echo_paths(json_path: Path, png_path: Path) -> None:
    click.echo(f"wrote {json_path} and {png_path}")


def _load(checkpoint: str):
    from ..checkpoint import load_model

    try:
        return load_model(checkpoint, with_info=True)
    except CheckpointError as err:
        raise click.BadParameter(str(err), param_hint="CHECKPOINT") from None


def _ckpt_stem(checkpoint: str) -> str:
    return Path(checkpoint).name.removesuffix(".safetensors") or "model"


@click.group("q", short_help="Conserved quantities Q: inspect, dynamics, ..., teleport.")
def command() -> None:
    """Conserved quantities of gradient flow (paper §5, App. E-H) and orbit teleportation."""


_out_option = click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder [default: results/q/<command>].",
)
_seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
_quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")


# ----------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------


@command.command("inspect", short_help="Q of every hidden layer of a trained model.")
@click.argument("checkpoint")
@_out_option
def inspect_cmd(checkpoint: str, out: Path | None) -> None:
    """Report the head's conserved quantities Q_k = |V_k|^2 + b_k^2 - alpha |U_k|^2 per hidden
    unit (or the full imbalance matrix of a linear head), its symmetry group and orbit dimension.

    CHECKPOINT is a .safetensors file or a shipped name such as paper_cnn.
    """
    from ..diagnostics.inspection import inspect_model, plot_inspection

    model, info = _load(checkpoint)
    try:
        result = inspect_model(model)
    except ValueError as err:
        raise _fail(err) from None
    result["checkpoint"] = info["path"]
    stem = _ckpt_stem(checkpoint)
    paths = _write(
        out or DEFAULT_OUT / "inspect",
        stem,
        "inspect",
        {"checkpoint": checkpoint},
        result,
        lambda r, p: plot_inspection(r, p, title=stem),
    )
    layer, sym = result["layers"][0], result["symmetry"]
    click.echo(
        f"{info['path']}: head {result['widths']['in_features']} -> "
        f"{result['widths']['hidden']} -> {result['widths']['num_classes']}, "
        f"sigma={layer['activation']['name']}, group={sym['group']}, "
        f"orbit dim={sym['orbit_dim']}"
    )
    if layer.get("note"):
        click.echo(f"note: {layer['note']}")
    per_unit = layer["per_unit"]
    if len(per_unit) <= 16:
        detail = "per unit: " + ", ".join(f"{q:.4g}" for q in per_unit)
    else:
        detail = (
            f"per unit ({len(per_unit)}): min {min(per_unit):.4g}, "
            f"mean {sum(per_unit) / len(per_unit):.4g}, max {max(per_unit):.4g} (all in the JSON)"
        )
    click.echo(f"Q total = {layer['total']:.6g}; {detail}")
    _echo_paths(*paths)


# ----------------------------------------------------------------------------------------------
# dynamics
# ----------------------------------------------------------------------------------------------

_POINTWISE = click.Choice(["identity", "relu", "leaky_relu", "tanh", "sigmoid"])


@command.command("dynamics", short_help="Fig. 3: Q under gradient descent; Prop. E.1 bound.")
@click.option(
    "--activation",
    "activations",
    type=_POINTWISE,
    multiple=True,
    default=("identity", "relu", "sigmoid", "tanh"),
    show_default=True,
    help="Hidden activation (repeat for several).",
)
@click.option(
    "--lr",
    "lrs",
    type=click.FloatRange(min=0, min_open=True),
    multiple=True,
    default=(0.1, 0.01, 0.001),
    show_default=True,
    help="Learning rate (repeat).",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Gradient-descent steps (the paper: 400000).",
)
@click.option("--m", type=click.IntRange(min=1), default=5, show_default=True, help="Output width m.")
@click.option("--h", type=click.IntRange(min=1), default=50, show_default=True, help="Hidden width h.")
@click.option("--n", type=click.IntRange(min=1), default=10, show_default=True, help="Input width n.")
@click.option(
    "--init-std",
    type=click.FloatRange(min=0, min_open=True),
    default=0.1,
    show_default=True,
    help="Std of the initial U, V entries.",
)
@_seed_option
@_out_option
@_quiet_option
def dynamics_cmd(activations, lrs, steps, m, h, n, init_std, seed, out, quiet) -> None:
    """Train W = U sigma(V) (whitened input) with several learning rates and record
    dQ~(t) (eq. 42) and the loss; check |Q_{t+1} - Q_t| <= lr^2 |dL/dt| (Prop. E.1) at every
    step of the linear network."""
    from ..diagnostics.dynamics import plot_q_dynamics, q_dynamics

    settings = dict(
        activations=list(activations),
        lrs=list(lrs),
        steps=steps,
        m=m,
        h=h,
        n=n,
        init_std=init_std,
        seed=seed,
    )
    try:
        result = q_dynamics(
            activations,
            lrs,
            steps=steps,
            m=m,
            h=h,
            n=n,
            init_std=init_std,
            seed=seed,
            progress=not quiet,
        )
    except ValueError as err:
        raise _fail(err) from None
    result["q_definition"] = "eq. 47: Q = 1/2 Tr U^T U - sum int_0^V sigma/sigma'"
    paths = _write(out or DEFAULT_OUT / "dynamics", "dynamics", "dynamics", settings, result, plot_q_dynamics)
    for name, res in result["results"].items():
        cells = ", ".join(
            f"lr={lr:g}: max|dQ~|={d:.2e} loss={f:.2e}"
            for lr, d, f in zip(res["lr"], res["max_abs_dQ_tilde"], res["final_loss"], strict=True)
        )
        click.echo(f"{name:9s} {cells}")
    if "identity" in result["results"]:
        e1 = result["results"]["identity"]["prop_e1"]
        click.echo(
            f"Prop. E.1 ({steps} steps x {len(lrs)} lrs): holds={e1['holds']}, "
            f"max |dQ|/(lr^2|dL/dt|) = {max(e1['max_ratio']):.3f}"
        )
    click.echo(
        "dQ~ grows with lr: " + ", ".join(f"{k}={v}" for k, v in result["checks"]["grows_with_lr"].items())
    )
    _echo_paths(*paths)


# ----------------------------------------------------------------------------------------------
# distribution
# ----------------------------------------------------------------------------------------------


class _ConfigType(click.ParamType):
    """``m,h,n,activation`` such as ``100,200,100,identity``."""

    name = "m,h,n,act"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = [p.strip() for p in str(value).split(",")]
        if len(parts) != 4:
            self.fail(f"expected m,h,n,activation (e.g. 100,200,100,identity), got {value!r}", param, ctx)
        try:
            m, h, n = (int(p) for p in parts[:3])
        except ValueError:
            self.fail(f"m, h, n must be integers, got {value!r}", param, ctx)
        if min(m, h, n) < 1:
            self.fail(f"m, h, n must be positive, got {value!r}", param, ctx)
        if parts[3] not in _POINTWISE.choices:
            self.fail(
                f"activation must be one of {list(_POINTWISE.choices)}, got {parts[3]!r}",
                param,
                ctx,
            )
        return (m, h, n, parts[3])


@command.command("distribution", short_help="Figs. 4-5: Q at initialization vs E[Q] = m - h.")
@click.option(
    "--config",
    "configs",
    type=_ConfigType(),
    multiple=True,
    default=None,
    help="m,h,n,activation to sample (repeat) [default: the paper's Figs. 4-5: "
    "100,100,100 / 100,200,100 / 200,100,100 identity; 100,100,100 relu, tanh, sigmoid].",
)
@click.option(
    "--init",
    "inits",
    type=click.Choice(["xavier", "glorot", "kaiming"]),
    multiple=True,
    default=("xavier", "kaiming"),
    show_default=True,
    help="Initialization (repeat); xavier = the paper's N(0, 1/fan_in).",
)
@click.option(
    "--samples",
    type=click.IntRange(min=2),
    default=1000,
    show_default=True,
    help="Initializations per configuration.",
)
@_seed_option
@_out_option
@_quiet_option
def distribution_cmd(configs, inits, samples, seed, out, quiet) -> None:
    """Sample Q = Tr U^T U - 2 sum int_0^V sigma/sigma' (= Tr[U^T U - V V^T] for sigma = id)
    over initializations and compare the mean with E[Q] (eq. 46; quadrature for nonlinear sigma)."""
    from ..diagnostics.distribution import DEFAULT_CONFIGS, plot_q_distribution, q_distribution

    configs = list(configs) or list(DEFAULT_CONFIGS)
    settings = dict(configs=configs, inits=list(inits), samples=samples, seed=seed)
    try:
        result = q_distribution(configs, inits, samples=samples, seed=seed, progress=not quiet)
    except ValueError as err:
        raise _fail(err) from None
    result["q_definition"] = "2 x eq. 47: Q = Tr U^T U - 2 sum int_0^V sigma/sigma' (eq. 46 scale)"
    paths = _write(
        out or DEFAULT_OUT / "distribution",
        "distribution",
        "distribution",
        settings,
        result,
        plot_q_distribution,
    )
    for r in result["results"]:
        paper = "" if r["paper_m_minus_h"] is None else f" (paper m-h = {r['paper_m_minus_h']})"
        click.echo(
            f"{r['init']:8s} {r['activation']:8s} (m,h,n)=({r['m']},{r['h']},{r['n']}): "
            f"mean {r['mean']:9.4f} +- {r['stderr']:.4f}  E[Q] {r['expected']:9.4f}{paper}  "
            f"z={r['z']:+.2f}"
        )
    click.echo(f"all means within 3 standard errors: {result['checks']['all_within_3se']}")
    _echo_paths(*paths)


# ----------------------------------------------------------------------------------------------
# convergence
# ----------------------------------------------------------------------------------------------


@command.command("convergence", short_help="Figs. 6-7: loss curves from inits with chosen Q.")
@click.option(
    "--kind",
    type=click.Choice(["elementwise", "radial"]),
    default="radial",
    show_default=True,
    help="Fig. 6 (W = U sigma(V)) or Fig. 7 / Prop. G.2 (radial).",
)
@click.option(
    "--activation",
    "activations",
    type=_POINTWISE,
    multiple=True,
    default=("identity", "relu", "tanh", "sigmoid"),
    show_default=True,
    help="Activations for --kind elementwise (repeat).",
)
@click.option(
    "--target",
    "targets",
    type=float,
    multiple=True,
    default=None,
    help="Initial Q to reach exactly (repeat) [default: -10 -2 0 2 10 elementwise; 0.25 0.5 1 2 radial].",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Learning rate [default: 0.01 elementwise (mean loss), 1e-5 radial].",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Gradient-descent steps [default: 20000 elementwise, 100000 radial].",
)
@click.option(
    "--threshold",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Converged when L <= threshold * L(0) [default: 1e-4 elementwise, 1e-6 radial].",
)
@_seed_option
@_out_option
@_quiet_option
def convergence_cmd(kind, activations, targets, lr, steps, threshold, seed, out, quiet) -> None:
    """Move one initialization along its symmetry orbit to each target Q (same function, same
    initial loss) and train by gradient descent; report the steps to converge per Q."""
    from ..diagnostics.convergence import (
        convergence_elementwise,
        convergence_radial,
        plot_convergence,
    )

    kw: dict[str, Any] = {"seed": seed, "progress": not quiet}
    for key, value in (
        ("targets", tuple(targets) or None),
        ("lr", lr),
        ("steps", steps),
        ("threshold", threshold),
    ):
        if value is not None:
            kw[key] = value
    try:
        if kind == "radial":
            result = convergence_radial(**kw)
        else:
            result = convergence_elementwise(activations, **kw)
    except ValueError as err:
        raise _fail(err) from None
    settings = {
        "kind": kind,
        **({"activations": list(activations)} if kind == "elementwise" else {}),
        **{k: v for k, v in kw.items() if k != "progress"},
    }
    result["q_definition"] = (
        "radial: Q = sum_i lambda_i = Tr[U^T U + V^T V] (eqs. 70-71)" if kind == "radial" else "eq. 47"
    )
    paths = _write(
        out or DEFAULT_OUT / "convergence",
        f"convergence-{kind}",
        "convergence",
        settings,
        result,
        plot_convergence,
    )
    if kind == "radial":
        r = result["results"]
        for q, s, sq in zip(r["targets"], r["steps_to_threshold"], r["steps_per_Q"], strict=True):
            click.echo(f"Q={q:<6g} steps to converge: {s}  steps/Q: {sq}")
        click.echo("checks: " + ", ".join(f"{k}={v}" for k, v in result["checks"].items()))
    else:
        for name, r in result["results"].items():
            cells = ", ".join(
                f"Q={q:g}: {s}" for q, s in zip(r["targets"], r["steps_to_threshold"], strict=True)
            )
            skipped = f" (skipped unreachable: {', '.join(r['skipped'])})" if r["skipped"] else ""
            click.echo(f"{name:9s} [{r['method'][0]}] steps to converge: {cells}{skipped}")
    _echo_paths(*paths)


# ----------------------------------------------------------------------------------------------
# hessian
# ----------------------------------------------------------------------------------------------


@command.command("hessian", short_help="Fig. 9: Hessian spectra at minima vs Q; orbit dimension.")
@click.option(
    "--activation",
    "activations",
    type=_POINTWISE,
    multiple=True,
    default=("identity", "relu", "tanh", "sigmoid"),
    show_default=True,
    help="Hidden activation (repeat).",
)
@click.option(
    "--init-std",
    "init_stds",
    type=click.FloatRange(min=0, min_open=True),
    multiple=True,
    default=(0.001, 0.3, 0.6, 0.9),
    show_default=True,
    help="Std of the initial entries, which sets Q (repeat).",
)
@click.option("--m", type=click.IntRange(min=1), default=10, show_default=True, help="Output width m.")
@click.option("--h", type=click.IntRange(min=1), default=50, show_default=True, help="Hidden width h.")
@click.option("--n", type=click.IntRange(min=1), default=5, show_default=True, help="Input width n.")
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=0.1,
    show_default=True,
    help="Learning rate (mean squared error, as the paper's code).",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Gradient-descent steps.",
)
@click.option(
    "--method",
    type=click.Choice(["auto", "full", "lanczos"]),
    default="auto",
    show_default=True,
    help="Dense Hessian (all eigenvalues) or Lanczos (top ones).",
)
@click.option(
    "--zero-tol",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-3,
    show_default=True,
    help="|eigenvalue| <= zero-tol counts as zero.",
)
@_seed_option
@_out_option
@_quiet_option
def hessian_cmd(activations, init_stds, m, h, n, lr, steps, method, zero_tol, seed, out, quiet) -> None:
    """Train W = U sigma(V) from inits with different Q, take the Hessian of ||Y - W||^2 at the
    end, and count the near-zero eigenvalues against the symmetry orbit dimension (Prop. C.3);
    also check eq. 83 on the one-dimensional example."""
    from ..diagnostics.hessian import hessian_study, plot_hessian

    settings = dict(
        activations=list(activations),
        init_stds=list(init_stds),
        m=m,
        h=h,
        n=n,
        lr=lr,
        steps=steps,
        method=method,
        zero_tol=zero_tol,
        seed=seed,
    )
    try:
        result = hessian_study(
            activations,
            init_stds,
            m=m,
            n=n,
            h=h,
            lr=lr,
            steps=steps,
            zero_tol=zero_tol,
            method=method,
            seed=seed,
            progress=not quiet,
        )
    except ValueError as err:
        raise _fail(err) from None
    result["q_definition"] = "eq. 47 at initialization"
    paths = _write(out or DEFAULT_OUT / "hessian", "hessian", "hessian", settings, result, plot_hessian)
    d = m * h + h * n
    for name, res in result["results"].items():
        for r in res["runs"]:
            zero = "-" if r["near_zero"] is None else r["near_zero"]
            click.echo(
                f"{name:9s} Q={r['Q0']:9.4g} loss={r['final_loss']:.1e} near-zero {zero}/{d} "
                f"orbit dim {r['orbit_dim']} (formula {r['orbit_dim_formula']}) "
                f"top {r['top'][0]:.4g}"
            )
    one = result["one_dimensional"]
    click.echo(
        f"1-D example: eigenvalues 0 and sqrt(Q^2+4) for 1/2(1-UV)^2 (2 sqrt(Q^2+4), eq. 83, "
        f"for (1-UV)^2); max abs error {one['max_abs_err']:.1e}"
    )
    click.echo("checks: " + ", ".join(f"{k}={v}" for k, v in result["checks"].items()))
    _echo_paths(*paths)


# ----------------------------------------------------------------------------------------------
# teleport
# ----------------------------------------------------------------------------------------------


def _parse_floats(text: str | None, param: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated numbers, got {text!r}", param_hint=param
        ) from None
    if not values or not all(math.isfinite(v) for v in values):
        raise click.BadParameter(f"expected finite numbers, got {text!r}", param_hint=param)
    return values


def _embed(model, images, batch_size: int = 500):
    import torch

    feats = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            feats.append(model.embed(images[i : i + batch_size].float().div(255)).double())
    return torch.cat(feats)


def _plot_teleport(report: dict[str, Any], path: Path) -> None:
    from ..diagnostics.common import pyplot, save_figure

    plt = pyplot()
    h = len(report["Q_before"])
    k = list(range(h))
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 0.5 * h + 3), 3.2))
    axes[0].bar([i - 0.2 for i in k], report["Q_before"], width=0.4, label="before")
    axes[0].bar([i + 0.2 for i in k], report["Q_after"], width=0.4, label="after")
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set_xlabel("hidden unit k")
    axes[0].set_ylabel(r"$Q_k$")
    axes[0].legend(fontsize=7)
    axes[0].set_title(
        f"{report['mode']}: Q {report['Q_total_before']:.4g} -> {report['Q_total_after']:.4g}",
        fontsize=9,
    )
    axes[1].bar(k, report["scales"])
    axes[1].set_yscale("log")
    axes[1].set_xlabel("hidden unit k")
    axes[1].set_ylabel("scale $c_k$")
    ev = report.get("evaluation")
    if ev:
        axes[1].set_title(
            f"test loss {ev['before']['loss']:.5f} -> {ev['after']['loss']:.5f}, "
            f"acc {ev['before']['accuracy']:.4f} -> {ev['after']['accuracy']:.4f}",
            fontsize=8,
        )
    fig.tight_layout()
    save_figure(fig, path)


@command.command("teleport", short_help="Move a model along its orbit to a chosen Q or flatness.")
@click.argument("checkpoint")
@click.option("--target", type=float, default=None, help="Target total Q = sum_k Q_k of the head.")
@click.option("--unit-targets", default=None, help="Target Q_k per hidden unit, comma-separated (h numbers).")
@click.option(
    "--flattest",
    type=click.Choice(["trace", "top"]),
    default=None,
    help="Go to the orbit point with the smallest head Hessian trace (exact) or top "
    "eigenvalue (Lanczos + pattern search) on training data.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="New checkpoint (.safetensors) [default: results/q/teleport/<name>-<mode>"
    ".safetensors]; JSON and PNG are written next to it.",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="CIFAR-10 source [default: $SYMENSEMBLE_DATA or ~/.cache/symensemble].",
)
@click.option(
    "--eval/--no-eval",
    "do_eval",
    default=True,
    show_default=True,
    help="Measure test loss and accuracy before and after (needs the data).",
)
@click.option(
    "--samples",
    type=click.IntRange(min=16),
    default=512,
    show_default=True,
    help="Training images whose features define the Hessian for --flattest.",
)
@click.option(
    "--max-evals",
    type=click.IntRange(min=2),
    default=40,
    show_default=True,
    help="Top-eigenvalue evaluations of the --flattest top search.",
)
@click.option(
    "--lanczos-iters",
    type=click.IntRange(min=2),
    default=20,
    show_default=True,
    help="Lanczos iterations per top-eigenvalue evaluation.",
)
@click.option(
    "--tol",
    type=click.FloatRange(min=0),
    default=1e-5,
    show_default=True,
    help="Largest relative change of test loss/accuracy accepted.",
)
@_seed_option
@_quiet_option
def teleport_cmd(
    checkpoint,
    target,
    unit_targets,
    flattest,
    out,
    data,
    do_eval,
    samples,
    max_evals,
    lanczos_iters,
    tol,
    seed,
    quiet,
) -> None:
    """Apply g = diag(c) to the head (V_k -> c_k V_k, b_k -> c_k b_k, U_k -> c_k^-alpha U_k):
    the network function is unchanged while Q moves exactly to --target / --unit-targets, or to
    the flattest point found (--flattest). Writes a new checkpoint.

    CHECKPOINT is a .safetensors file or a shipped name such as paper_cnn.
    """
    import torch

    from ..checkpoint import save_checkpoint
    from ..diagnostics.common import run_header, write_json
    from ..diagnostics.teleport import teleport, teleport_group

    chosen = [x is not None for x in (target, unit_targets, flattest)]
    if sum(chosen) != 1:
        raise click.UsageError("give exactly one of --target, --unit-targets or --flattest")
    if target is not None and not math.isfinite(target):
        raise click.BadParameter(f"must be finite, got {target}", param_hint="--target")
    per_unit = _parse_floats(unit_targets, "--unit-targets")
    if out is not None and out.suffix != ".safetensors":
        raise click.BadParameter(f"must end in .safetensors, got {str(out)!r}", param_hint="--out")
    model, info = _load(checkpoint)
    try:
        params, _, _ = teleport_group(model)
    except ValueError as err:
        raise _fail(err) from None
    if per_unit is not None and len(per_unit) != params.widths[1]:
        raise click.BadParameter(
            f"the head has {params.widths[1]} hidden units, got {len(per_unit)} targets",
            param_hint="--unit-targets",
        )
    dataset = None
    if do_eval or flattest is not None:
        from ..data import DataError, load_cifar10

        try:
            dataset = load_cifar10(data, val_size=0)  # train + test only
        except DataError as err:
            raise click.BadParameter(
                f"{err} (use --no-eval to skip the evaluation)", param_hint="--data"
            ) from None
    features = labels = None
    if flattest is not None:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(dataset.train), generator=gen)[:samples].sort().values
        subset = dataset.train.subset(idx)
        features, labels = _embed(model, subset.images), subset.labels
    try:
        new, report = teleport(
            model,
            total=target,
            per_unit=per_unit,
            flattest=flattest,
            features=features,
            labels=labels,
            max_evals=max_evals,
            iters=lanczos_iters,
            seed=seed,
            progress=not quiet,
        )
    except ValueError as err:
        raise _fail(err) from None
    report["source_checkpoint"] = info["path"]
    metrics = dict(info.get("metrics") or {})
    ok = True
    if do_eval:
        from ..train import evaluate_split

        before = evaluate_split(model, dataset.test)
        after = evaluate_split(new, dataset.test)
        rel_loss = abs(after["loss"] - before["loss"]) / max(abs(before["loss"]), 1e-12)
        rel_acc = abs(after["accuracy"] - before["accuracy"]) / max(abs(before["accuracy"]), 1e-12)
        ok = rel_loss <= tol and rel_acc <= tol
        report["evaluation"] = {
            "split": "test",
            "before": before,
            "after": after,
            "rel_loss_change": rel_loss,
            "rel_accuracy_change": rel_acc,
            "tol": tol,
            "equal": ok,
        }
        metrics.update({"test_loss": after["loss"], "test_accuracy": after["accuracy"]})
    mode = report["mode"]
    out = out or DEFAULT_OUT / "teleport" / f"{_ckpt_stem(checkpoint)}-{mode}.safetensors"
    summary = {k: report[k] for k in ("mode", "Q_total_before", "Q_total_after", "scales")}
    summary.update({"source_checkpoint": info["path"], "target": report.get("target")})
    save_checkpoint(
        new,
        out,
        recipe=info.get("recipe"),
        epoch=info.get("epoch"),
        metrics=metrics,
        data_source=info.get("data_source"),
        # The source's optimizer tensors are not carried over (its moments belong to the old
        # parameters anyway), so drop its optimizer metadata and mark the run as finished:
        # `symensemble train --resume` must not continue from this file with fresh moments.
        extra={
            **{k: v for k, v in (info.get("extra") or {}).items() if k != "optimizer"},
            "complete": True,
            "teleport": summary,
        },
    )
    settings = dict(
        checkpoint=checkpoint,
        target=target,
        unit_targets=per_unit,
        flattest=flattest,
        samples=samples,
        max_evals=max_evals,
        lanczos_iters=lanczos_iters,
        tol=tol,
        seed=seed,
        eval=do_eval,
    )
    json_path, png_path = out.with_suffix(".json"), out.with_suffix(".png")
    write_json(
        json_path,
        {**run_header("symensemble q teleport", settings), "checkpoint": str(out), **report},
    )
    _plot_teleport(report, png_path)
    click.echo(
        f"{mode}: Q total {report['Q_total_before']:.6g} -> {report['Q_total_after']:.6g}"
        + (
            f" (target {report['target']}, error {report['target_abs_error']:.2e})"
            if "target_abs_error" in report
            else ""
        )
    )
    if "flatness" in report:
        fl = report["flatness"]
        line = f"Hessian trace {fl['trace_before']:.5g} -> {fl['trace_after']:.5g}"
        if "top_after" in fl:
            line += f"; top eigenvalue {fl['top_before']:.5g} -> {fl['top_after']:.5g}"
        click.echo(line)
    if do_eval:
        ev = report["evaluation"]
        click.echo(
            f"test loss {ev['before']['loss']:.7f} -> {ev['after']['loss']:.7f} "
            f"(rel {ev['rel_loss_change']:.1e}), accuracy {ev['before']['accuracy']:.4f} -> "
            f"{ev['after']['accuracy']:.4f} (rel {ev['rel_accuracy_change']:.1e})"
        )
    click.echo(f"wrote {out}, {json_path} and {png_path}")
    if not ok:
        raise click.ClickException(f"test loss/accuracy changed by more than --tol {tol:g}: see {json_path}")
