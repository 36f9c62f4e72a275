"""Hessian spectra at trained minima for several Q (paper App. H, Figure 9, Prop. C.3, eq. 83).

Every symmetry direction M·θ* at a minimum θ* is a zero-curvature direction: the loss is
constant along the orbit, so the Hessian has at least dim(G·θ*) zero eigenvalues (Prop. 3.2,
C.3). For a two-layer linear network fitting a full-rank target exactly the kernel is exactly
the orbit tangent, e.g. 700 of the 750 eigenvalues for (n, h, m) = (5, 50, 10).

* :func:`full_hessian` — dense Hessian through ``torch.func`` (small networks).
* :func:`hvp_fn`, :func:`lanczos`, :func:`hutchinson_trace` — Hessian-vector products, the
  Lanczos spectrum estimate with full reorthogonalization, and a Hutchinson trace estimate
  (large networks, e.g. a CIFAR head).
* :func:`hessian_study` — Figure 9: train W = U σ(V) from inits with different Q and compare
  the number of near-zero eigenvalues with the orbit dimension.
* :func:`one_dimensional_example` — App. H.1: L = ½(Y − UVX)², X = Y = 1; at the minimum on
  the flow line with Q = U² − V² the eigenvalues are 0 and √(Q² + 4). The paper's eq. 83 prints
  2√(Q² + 4), which is the spectrum of the unhalved loss (Y − UVX)²: the matrix of eq. 82 has
  trace √(Q² + 4) and determinant 0. Both conventions are reported.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..plotting import new_figure, save_figure
from ..runtime import single_thread
from ..symmetry.activations import create_activation
from ..symmetry.elementwise import elementwise_q
from ..symmetry.groups import group_kind_for_activation
from ..symmetry.linear import LinearSymmetry
from ..symmetry.orbits import orbit_dimension_formula
from ..symmetry.stack import StackParams
from .common import TwoLayerProblem

__all__ = [
    "full_hessian",
    "hvp_fn",
    "lanczos",
    "hutchinson_trace",
    "hessian_study",
    "one_dimensional_example",
    "plot_hessian",
]

log = logging.getLogger(__name__)

MatVec = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def _quiet_jit_script() -> Iterator[None]:
    """torch.func's hessian/jvp call the deprecated torch.jit.script internally (torch >= 2.10):
    its FutureWarning says nothing about our code, so it is silenced here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        yield


def full_hessian(loss: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """∇²L(x) of a scalar function of a flat vector, through ``torch.func.hessian``.

    Shape:
        x (d,) → (d, d), symmetrized.
    """
    with _quiet_jit_script():
        H = torch.func.hessian(loss)(x)
    return 0.5 * (H + H.T)


def hvp_fn(loss: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> MatVec:
    """v ↦ ∇²L(x) v by forward-over-reverse differentiation (no d × d matrix)."""
    grad = torch.func.grad(loss)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        with _quiet_jit_script():
            return torch.func.jvp(grad, (x,), (v,))[1]

    return matvec


def lanczos(
    matvec: MatVec,
    dim: int,
    iters: int = 60,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Ritz values of a symmetric operator after ``iters`` Lanczos steps (ascending).

    Full reorthogonalization keeps the basis orthonormal, so the extreme Ritz values converge
    to the extreme eigenvalues (the top one within a few tens of iterations).

    Args:
        matvec: v ↦ A v for symmetric A (dim × dim).
        dim: the operator's size.
        iters: Krylov dimension (capped at ``dim``).
        generator: RNG of the start vector.

    Shape:
        (k,) with k ≤ iters.
    """
    iters = max(1, min(iters, dim))
    basis = torch.zeros(iters, dim, dtype=dtype, device=device)
    q = torch.randn(dim, generator=generator, dtype=dtype).to(device)
    q = q / torch.linalg.vector_norm(q)
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    for j in range(iters):
        basis[j] = q
        w = matvec(q).to(dtype)
        alpha = torch.dot(w, q)
        alphas.append(alpha)
        for _ in range(2):  # full reorthogonalization, twice is enough
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = torch.linalg.vector_norm(w)
        if j == iters - 1 or float(beta) <= 1e-12 * max(1.0, float(alpha.abs())):
            break
        betas.append(beta)
        q = w / beta
    a = torch.stack(alphas)
    T = torch.diag(a)
    if betas:
        b = torch.stack(betas[: len(alphas) - 1])
        T = T + torch.diag(b, 1) + torch.diag(b, -1)
    return torch.linalg.eigvalsh(T)


def hutchinson_trace(
    matvec: MatVec,
    dim: int,
    samples: int = 32,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """Tr A ≈ mean of zᵀAz over Rademacher z; returns (estimate, standard error)."""
    if samples < 2:
        raise ValueError(f"samples must be >= 2, got {samples}")
    vals = []
    for _ in range(samples):
        z = torch.randint(0, 2, (dim,), generator=generator).to(dtype=dtype, device=device) * 2 - 1
        vals.append(torch.dot(z, matvec(z).to(dtype)))
    v = torch.stack(vals)
    return float(v.mean()), float(v.std() / math.sqrt(samples))


# ----------------------------------------------------------------------------------------------
# Figure 9
# ----------------------------------------------------------------------------------------------


def _orbit_info(act: str, h: int, n: int, m: int, U: torch.Tensor, V: torch.Tensor) -> dict[str, Any]:
    a = create_activation(act)
    try:
        kind, _ = group_kind_for_activation(a)
    except ValueError:
        return {"group": None, "orbit_dim": 0, "orbit_dim_formula": 0}
    sym = LinearSymmetry.for_activations([a], [h])
    params = StackParams.two_layer(U, V)
    return {
        "group": sym.groups[0].name,
        "orbit_dim": sym.orbit_dimension(params),  # closed-form Gram spectrum, O(h³)
        "orbit_dim_formula": orbit_dimension_formula(kind, n, h, m),
    }


def hessian_study(
    activations: Sequence[str] = ("identity", "relu", "tanh", "sigmoid"),
    init_stds: Sequence[float] = (0.001, 0.3, 0.6, 0.9),
    *,
    m: int = 10,
    n: int = 5,
    h: int = 50,
    lr: float = 0.1,
    steps: int = 10_000,
    zero_tol: float = 1e-3,
    method: str = "auto",
    top_k: int = 10,
    lanczos_iters: int = 80,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Figure 9: Hessian eigenvalues of ‖Y − U σ(V)‖² at minima reached from different Q.

    Each run starts from U, V ~ N(0, std²) (the paper's way of varying Q), trains by gradient
    descent on the mean squared error (``lr`` as in the paper's code), and takes the Hessian of
    the summed squared error ‖Y − U σ(V)‖² (eq. 80) at the end. ``Q`` is eq. 47 at the start.

    Args:
        method: ``"full"`` (dense, all eigenvalues, near-zero count), ``"lanczos"`` (top
            ``top_k`` eigenvalues and a Hutchinson trace, no dense matrix) or ``"auto"``
            (full when d ≤ 4000).
        zero_tol: |λ| ≤ zero_tol counts as zero (the paper: 10⁻³).

    Returns:
        Per activation and init: Q, final loss and gradient norm, eigenvalues (full) or top-k,
        near-zero count, orbit dimension (numerical rank and formula).
    """
    if method not in ("auto", "full", "lanczos"):
        raise ValueError(f"method must be 'auto', 'full' or 'lanczos', got {method!r}")
    d = m * h + h * n
    use_full = method == "full" or (method == "auto" and d <= 4000)
    spectrum = dict(zero_tol=zero_tol, top_k=top_k, lanczos_iters=lanczos_iters, seed=seed, use_full=use_full)
    results: dict[str, Any] = {}
    for name in activations:
        act = create_activation(name)
        total, q0, U, V = _train_from_stds(act, init_stds, m, n, h, lr, steps, seed, progress)
        loss, gU, gV = total.loss_and_grads(U, V)
        runs = []
        for i, std in enumerate(init_stds):
            run: dict[str, Any] = {
                "init_std": std,
                "Q0": float(q0[i]),
                "Q_final": float(elementwise_q(U[i], V[i], act)),
                "final_loss": float(loss[i]),
                "grad_norm": float(torch.sqrt(gU[i].square().sum() + gV[i].square().sum())),
                **_orbit_info(name, h, n, m, U[i], V[i]),
                **_spectrum(total, U[i], V[i], check_lanczos=i == 0, **spectrum),
            }
            runs.append(run)
            log.info("hessian %s std=%g: Q0=%.4g near-zero %s orbit %s", name, std, run["Q0"],
                     run.get("near_zero"), run["orbit_dim"])
        results[name] = {"runs": runs}
    return {"results": results, "checks": _hessian_checks(results, use_full),
            "one_dimensional": one_dimensional_example()}


def _train_from_stds(
    act: Any, init_stds: Sequence[float], m: int, n: int, h: int, lr: float, steps: int, seed: int,
    progress: bool,
) -> tuple[TwoLayerProblem, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One seeded target and base init scaled by each std, trained side by side on the mean
    squared error. Returns (the summed-error problem, Q at the start, U, V at the end)."""
    gen = torch.Generator().manual_seed(seed)
    Y = torch.randn(m, n, generator=gen, dtype=torch.float64)
    base_U = torch.randn(m, h, generator=gen, dtype=torch.float64)
    base_V = torch.randn(h, n, generator=gen, dtype=torch.float64)
    train = TwoLayerProblem(Y, act, "mean")
    U = torch.stack([base_U * s for s in init_stds])
    V = torch.stack([base_V * s for s in init_stds])
    q0 = elementwise_q(U, V, act)
    with single_thread():
        bar = tqdm(range(steps), desc=f"hessian train [{act.name}]", disable=not progress, mininterval=2.0)
        for _ in bar:
            _, gU, gV = train.loss_and_grads(U, V)
            U, V = U - lr * gU, V - lr * gV
    return TwoLayerProblem(Y, act, "sum"), q0, U, V


def _spectrum(
    total: TwoLayerProblem, U: torch.Tensor, V: torch.Tensor, *, use_full: bool, zero_tol: float,
    top_k: int, lanczos_iters: int, seed: int, check_lanczos: bool,
) -> dict[str, Any]:
    """Hessian spectrum of the summed squared error at (U, V): dense (all eigenvalues, the
    near-zero count; ``check_lanczos`` also compares Lanczos' top 5) or Lanczos + Hutchinson."""
    (m, h), n = U.shape, V.shape[1]
    d = m * h + h * n

    def loss_flat(x: torch.Tensor) -> torch.Tensor:
        return total.loss(x[: m * h].view(1, m, h), x[m * h :].view(1, h, n))[0]

    x = torch.cat([U.reshape(-1), V.reshape(-1)])
    mv = hvp_fn(loss_flat, x)
    if not use_full:
        ritz = lanczos(mv, d, lanczos_iters, generator=torch.Generator().manual_seed(seed))
        tr, tr_se = hutchinson_trace(mv, d, 32, generator=torch.Generator().manual_seed(seed))
        return {"method": "lanczos", "num_params": d, "near_zero": None,
                "top": ritz.flip(0)[:top_k].tolist(), "trace": tr, "trace_stderr": tr_se}
    ev = torch.linalg.eigvalsh(full_hessian(loss_flat, x))
    nonzero = ev[ev.abs() > zero_tol]
    out = {
        "method": "full",
        "num_params": d,
        "near_zero": int((ev.abs() <= zero_tol).sum()),
        "negative": int((ev < -zero_tol).sum()),
        "eigenvalues": ev.tolist(),
        "top": ev.flip(0)[:top_k].tolist(),
        "nonzero_mean": float(nonzero.mean()) if nonzero.numel() else 0.0,
        "nonzero_median": float(nonzero.median()) if nonzero.numel() else 0.0,
        "trace": float(ev.sum()),
    }
    if check_lanczos:
        ritz = lanczos(mv, d, lanczos_iters, generator=torch.Generator().manual_seed(seed))
        k = min(5, ritz.numel())
        out["lanczos_check_top5_abs_err"] = float((ritz.flip(0)[:k] - ev.flip(0)[:k]).abs().max())
    return out


def _hessian_checks(results: dict[str, Any], use_full: bool) -> dict[str, Any]:
    """The paper's claims: near-zero count = orbit dimension (linear), spectrum centre grows with Q."""
    checks: dict[str, Any] = {}
    if "identity" in results and use_full:
        lin = results["identity"]["runs"]
        converged = [r for r in lin if r["final_loss"] < 1e-8]
        checks["linear_near_zero_equals_orbit_dim"] = bool(converged) and all(
            r["near_zero"] == r["orbit_dim"] == r["orbit_dim_formula"] for r in converged
        )
        checks["linear_converged_runs"] = len(converged)
        qs = [r["Q0"] for r in converged]
        centers = [r["nonzero_mean"] for r in converged]
        order = sorted(range(len(qs)), key=lambda j: qs[j])
        checks["linear_center_increases_with_Q"] = all(
            centers[a] <= centers[b] for a, b in zip(order, order[1:], strict=False)
        )
    for name, res in results.items():
        if use_full:
            checks.setdefault("near_zero_at_least_orbit_dim", {})[name] = all(
                r["near_zero"] >= r["orbit_dim"] for r in res["runs"] if r["final_loss"] < 1e-6
            )
    return checks


def one_dimensional_example(
    qs: Sequence[float] = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0),
    *,
    product0: float = 0.2,
    dt: float = 0.01,
    time: float = 60.0,
) -> dict[str, Any]:
    """App. H.1, eqs. 81–83: L = ½(1 − UV)² in one dimension.

    For each Q, the gradient flow (RK4, step ``dt``, up to ``time``) starts at (U₀, V₀) with
    U₀² − V₀² = Q and U₀V₀ = ``product0`` and runs to the minimum UV = 1 on the flow line of
    that Q (Figure 8); the Hessian there is compared with the closed forms
    λ = 0 and √(Q² + 4) (½-loss) — and 2√(Q² + 4), the paper's eq. 83, which holds for the
    loss (1 − UV)² without the ½.

    Returns:
        Per Q: the reached Q (conserved), the numerical eigenvalues for both loss
        conventions, the closed forms and the largest absolute error.
    """
    rows = []
    for q in qs:
        r = math.sqrt(q * q + 4 * product0 * product0)
        u, v = _rk4_flow_1d(math.sqrt((q + r) / 2), math.sqrt((-q + r) / 2), dt, time)
        rows.append({"Q": q, **_hessian_at_1d(torch.tensor([u, v], dtype=torch.float64))})
    return {"rows": rows, "max_abs_err": max((row["abs_err"] for row in rows), default=0.0)}


def _rk4_flow_1d(u: float, v: float, dt: float, time: float) -> tuple[float, float]:
    """Gradient flow of L = ½(1 − UV)² from (u, v) by RK4 with step ``dt`` up to ``time``."""
    def vel(a: float, b: float) -> tuple[float, float]:
        res = 1 - a * b  # −∇L = ((1 − UV)V, (1 − UV)U)
        return res * b, res * a

    for _ in range(int(round(time / dt))):
        k1 = vel(u, v)
        k2 = vel(u + 0.5 * dt * k1[0], v + 0.5 * dt * k1[1])
        k3 = vel(u + 0.5 * dt * k2[0], v + 0.5 * dt * k2[1])
        k4 = vel(u + dt * k3[0], v + dt * k3[1])
        u += dt / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        v += dt / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    return u, v


def _hessian_at_1d(x: torch.Tensor) -> dict[str, Any]:
    """Hessian eigenvalues of ½(1 − UV)² and (1 − UV)² at x = (U, V) against the closed forms
    0 and √(Q² + 4) (twice that without the ½, eq. 83), with Q = U² − V² read at x."""
    u, v = x[0], x[1]

    def half(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1 - z[0] * z[1]) ** 2

    def plain(z: torch.Tensor) -> torch.Tensor:
        return (1 - z[0] * z[1]) ** 2

    ev_half = torch.linalg.eigvalsh(full_hessian(half, x))
    ev_plain = torch.linalg.eigvalsh(full_hessian(plain, x))
    q_end = float(u * u - v * v)
    closed = [0.0, math.sqrt(q_end * q_end + 4)]
    err = max(
        float((ev_half - torch.tensor(closed, dtype=torch.float64)).abs().max()),
        float((ev_plain - 2 * torch.tensor(closed, dtype=torch.float64)).abs().max()),
    )
    return {"Q_reached": q_end, "UV": float(u * v), "eig_half_loss": ev_half.tolist(),
            "eig_plain_loss": ev_plain.tolist(), "closed_half_loss": closed,
            "closed_plain_loss_eq83": [0.0, 2 * closed[1]], "abs_err": err}


def plot_hessian(result: dict[str, Any], path) -> None:
    """Figure 9: histograms of the nonzero Hessian eigenvalues per activation, one per Q."""
    names = list(result["results"])
    fig, axes = new_figure(1, len(names) + 1, figsize=(3.6 * (len(names) + 1), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        runs = result["results"][name]["runs"]
        spectra = []
        for run in runs:
            ev = torch.tensor(run.get("eigenvalues") or run["top"], dtype=torch.float64)
            spectra.append(ev[ev.abs() > 1e-3])
        hi = max((float(ev.max()) for ev in spectra if ev.numel()), default=1.0)
        lo = min((float(ev.min()) for ev in spectra if ev.numel()), default=0.0)
        bins = torch.linspace(min(lo, 0.0), hi, 41).numpy()
        for run, ev in zip(runs, spectra, strict=True):
            label = f"Q={round(run['Q0'], 6):.3g}"
            if run.get("near_zero") is not None:
                label += f" (#0={run['near_zero']}, orbit={run['orbit_dim']})"
            ax.hist(ev.numpy(), bins=bins, alpha=0.5, label=label)
        ax.set_title(name)
        ax.set_xlabel("Hessian eigenvalue (|λ| > 1e-3)")
        ax.legend(fontsize=6)
    ax = axes[0, -1]
    rows = result["one_dimensional"]["rows"]
    qs = [r["Q_reached"] for r in rows]
    ax.plot(qs, [r["eig_half_loss"][-1] for r in rows], "o", label="numerical, ½ loss")
    grid = torch.linspace(min(qs), max(qs), 100)
    ax.plot(grid, torch.sqrt(grid**2 + 4), "-", label=r"$\sqrt{Q^2+4}$")
    ax.plot(qs, [r["eig_plain_loss"][-1] for r in rows], "s", label="numerical, unhalved")
    ax.plot(grid, 2 * torch.sqrt(grid**2 + 4), "--", label=r"$2\sqrt{Q^2+4}$ (eq. 83)")
    ax.set_xlabel("Q")
    ax.set_title("1-D example (App. H.1)")
    ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("count")
    fig.suptitle("Hessian eigenvalues at trained minima (paper Fig. 9)")
    fig.tight_layout()
    save_figure(fig, path)
