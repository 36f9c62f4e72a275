"""Q and the speed of convergence (paper App. G, Figures 6–7, Propositions G.1–G.3).

Q-controlled initialization: draw one initialization, then move it to each target Q
*exactly*. For activations with a scaling symmetry (identity, ReLU, LeakyReLU) the move is along
the orbit, V ↦ cV, U ↦ U c^{−α}, so the network function and the initial loss are the same for
every Q and only the conserved quantity differs (:func:`q_controlled_init`). Tanh and sigmoid
have no such symmetry; there U alone is rescaled (the initial function then changes too).

* :func:`convergence_elementwise` — Figure 6: W = U σ(V) fitted by gradient descent from
  initializations with the same function and different Q of eq. 47.
* :func:`convergence_radial` — Figure 7 and Prop. G.2: L = ½‖Y − U g(Vᵀ)‖² with the radial map
  g(W)_ij = W_ij/|W_i|² on rows and spectral initialization U = ΦŪ, V = ΨV̄. Each unit then
  has the conserved λ_i = ū_i² + v̄_i² (the homogeneous Q with α = −1, eq. 71) and its singular
  value obeys σ̇ᵢ = (σᵢʸ − σᵢˣ)(σᵢˣ² + 1)²/λᵢ (eq. 65): scaling every λᵢ by c² slows the flow
  by exactly c², so the steps to converge are proportional to Q = Σλᵢ, and
  |σᵢˣ(t) − σᵢʸ| ≤ |σᵢˣ(0) − σᵢʸ| e^{−t/λᵢ} (Prop. G.3).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..plotting import new_figure, save_figure
from ..runtime import single_thread
from ..symmetry.activations import create_activation
from ..symmetry.conserved import orbit_scale_for_target
from ..symmetry.elementwise import elementwise_q_terms
from ..symmetry.groups import group_kind_for_activation
from .common import TwoLayerProblem, log_spaced_steps

__all__ = [
    "q_controlled_init",
    "convergence_elementwise",
    "spectral_init",
    "convergence_radial",
    "plot_convergence",
]

log = logging.getLogger(__name__)


def q_controlled_init(
    U: torch.Tensor, V: torch.Tensor, act: str, target: float
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Move (U, V) to Q = ``target`` exactly, Q = ½ Tr UᵀU − Σ ∫₀^V σ/σ′ (eq. 47).

    Homogeneous σ of degree α (identity, ReLU, LeakyReLU): along the orbit V ↦ cV,
    U ↦ U c^{−α}, where Q(c) = c^{−2α} f₁ − c² f₂ takes every value in its range once
    (function unchanged). Other σ: U ↦ cU, Q = c² f₁ − f₂ ≥ −f₂ (function changes).

    Args:
        U: (m, h); V: (h, n).
        act: pointwise activation.
        target: the wanted Q.

    Returns:
        (U′, V′, method) with method ``"orbit"`` or ``"rescale_U"``.

    Raises:
        ValueError: the target is outside the reachable range (the message gives the range).
    """
    a = create_activation(act)
    f1, f2 = elementwise_q_terms(U, V, a)
    try:
        kind, alpha = group_kind_for_activation(a)
    except ValueError:
        kind, alpha = None, 1.0
    if kind in ("gl", "scaling") and a.pointwise:
        # −Q(c) = f₂ c² − α (f₁/α) c^{−2α}: the homogeneous form solved by orbit_scale_for_target
        try:
            c = float(orbit_scale_for_target(f2, f1 / alpha, -float(target), alpha))
        except ValueError as err:
            raise ValueError(f"Q = {target:g} is unreachable along the {a.name} orbit: {err}") from None
        return U * c ** (-alpha), V * c, "orbit"
    if float(f1) <= 0:
        raise ValueError("U is zero: Q cannot be controlled by rescaling it")
    c2 = (float(target) + float(f2)) / float(f1)
    if c2 <= 0:
        raise ValueError(
            f"Q = {target:g} is unreachable for {a.name!r} by rescaling U: Q >= -f2(V) = {-float(f2):.4g}"
        )
    return U * math.sqrt(c2), V, "rescale_U"


class _FirstBelow:
    """Per run, the first step s with L(s) ≤ threshold·L(0), tracked without host syncs."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.level: torch.Tensor | None = None
        self.first: torch.Tensor | None = None

    def update(self, step: int, loss: torch.Tensor) -> None:
        if self.level is None:
            self.level = self.threshold * loss
            self.first = torch.full(loss.shape, -1, dtype=torch.long)
        hit = (self.first < 0) & (loss <= self.level)
        self.first = torch.where(hit, torch.full_like(self.first, step), self.first)

    def result(self) -> list[int | None]:
        return [None if f < 0 else int(f) for f in self.first.tolist()]


def convergence_elementwise(
    activations: Sequence[str] = ("identity", "relu", "tanh", "sigmoid"),
    targets: Sequence[float] = (-10.0, -2.0, 0.0, 2.0, 10.0),
    *,
    lr: float = 0.01,
    steps: int = 20_000,
    m: int = 5,
    n: int = 10,
    h: int = 50,
    init_std: float = 0.1,
    reduction: str = "mean",
    threshold: float = 1e-4,
    seed: int = 0,
    num_records: int = 300,
    progress: bool = False,
) -> dict[str, Any]:
    """Figure 6: loss curves of W = U σ(V) from Q-controlled initializations (float64).

    Targets a given activation cannot reach are skipped and listed with the reason.

    Returns:
        ``{"results": {act: {...}}, "checks": {...}}`` with, per target Q, the method, the
        initial and final loss, and the first step at which L ≤ threshold · L(0).
    """
    if lr <= 0 or steps < 1:
        raise ValueError(f"need lr > 0 and steps >= 1, got lr={lr}, steps={steps}")
    results: dict[str, Any] = {}
    record = log_spaced_steps(steps, num_records)
    for name in activations:
        problem, U0, V0 = TwoLayerProblem.random(name, m, n, h, init_std, seed, reduction)
        U, V, kept, methods, skipped = _q_controlled_inits(U0, V0, name, targets)
        f1, f2 = elementwise_q_terms(U, V, problem.act)
        q0 = f1 - f2
        curve, reach, U, V = _descend(problem, U, V, lr, steps, record, threshold, name, progress)
        f1, f2 = elementwise_q_terms(U, V, problem.act)
        results[name] = {
            "targets": kept,
            "Q0": q0.tolist(),
            "Q_final": (f1 - f2).tolist(),
            "method": methods,
            "skipped": skipped,
            "initial_loss": curve[:, 0].tolist(),
            "final_loss": curve[:, -1].tolist(),
            "steps_to_threshold": reach,
            "steps": record,
            "loss": curve.tolist(),
        }
        log.info("convergence %s: Q %s -> steps %s", name, kept, reach)
    return {"results": results, "checks": {name: _elementwise_checks(r) for name, r in results.items()}}


def _q_controlled_inits(
    U0: torch.Tensor, V0: torch.Tensor, name: str, targets: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, list[float], list[str], dict[str, str]]:
    """(U, V) stacked over the reachable targets, the targets kept, their methods, and the
    unreachable ones with the reason."""
    Us, Vs, kept, methods, skipped = [], [], [], [], {}
    for t in targets:
        try:
            U, V, method = q_controlled_init(U0, V0, name, t)
        except ValueError as err:
            skipped[str(t)] = str(err)
            continue
        Us.append(U)
        Vs.append(V)
        kept.append(float(t))
        methods.append(method)
    if not kept:
        raise ValueError(f"no target Q in {list(targets)} is reachable for {name!r}: {skipped}")
    return torch.stack(Us), torch.stack(Vs), kept, methods, skipped


def _descend(
    problem: TwoLayerProblem, U: torch.Tensor, V: torch.Tensor, lr: float, steps: int, record: list[int],
    threshold: float, name: str, progress: bool,
) -> tuple[torch.Tensor, list[int | None], torch.Tensor, torch.Tensor]:
    """Gradient descent of all runs side by side: (loss curve (R, K) at the recorded steps,
    first step below threshold·L(0) per run, final U, final V)."""
    curves, first = [], _FirstBelow(threshold)
    with single_thread():
        for s in tqdm(range(steps + 1), desc=f"convergence [{name}]", disable=not progress, mininterval=2.0):
            loss, gU, gV = problem.loss_and_grads(U, V)
            first.update(s, loss)
            if s in record:
                curves.append(loss)
            if s == steps:
                break
            U, V = U - lr * gU, V - lr * gV
    return torch.stack(curves, 1), first.result(), U, V


def _elementwise_checks(r: dict[str, Any]) -> dict[str, Any]:
    """Same initial loss for every Q; Q changes the convergence; which Q converged first."""
    fastest = min(
        range(len(r["targets"])),
        key=lambda i: (
            r["steps_to_threshold"][i] is None, r["steps_to_threshold"][i] or 0, r["final_loss"][i]
        ),
    )
    return {
        "same_initial_loss": bool(
            max(r["initial_loss"]) - min(r["initial_loss"]) <= 1e-9 * max(1.0, max(r["initial_loss"]))
        ),
        "Q_spread_changes_convergence": len(set(r["steps_to_threshold"])) > 1,
        "fastest_Q": r["targets"][fastest],
    }


# ----------------------------------------------------------------------------------------------
# Radial (Prop. G.2)
# ----------------------------------------------------------------------------------------------


def _radial_loss_and_grads(
    Y: torch.Tensor, U: torch.Tensor, V: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """L = ½‖Y − U g(Vᵀ)‖², ∂L/∂U, ∂L/∂V and X = U g(Vᵀ) in closed form.

    g′ on a row w is (I − 2wwᵀ/|w|²)/|w|² (symmetric), so ∂L/∂w = (d − 2w(wᵀd)/|w|²)/|w|².
    """
    Wt = V.transpose(-1, -2)  # (R, k, n)
    r2 = Wt.square().sum(-1, keepdim=True)
    G = Wt / r2
    X = U @ G
    R = X - Y
    loss = 0.5 * R.square().sum((-2, -1))
    gU = R @ G.transpose(-1, -2)
    D = U.transpose(-1, -2) @ R  # ∂L/∂G (R, k, n)
    gWt = (D - 2 * Wt * (Wt * D).sum(-1, keepdim=True) / r2) / r2
    return loss, gU, gWt.transpose(-1, -2), X


def spectral_init(
    Y: torch.Tensor, u: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """U₀ = ΦŪ, V₀ = ΨV̄ with Y = ΦΣΨᵀ and diagonal Ū = diag(u), V̄ = diag(v) (App. G.2).

    Shape:
        Y (m, n), u (…, k), v (…, k) with k ≤ min(m, n) → U (…, m, k), V (…, n, k), Φ (m, m),
        Ψ (n, n), σʸ (k,).
    """
    Phi, S, Psi_t = torch.linalg.svd(Y, full_matrices=True)
    Psi = Psi_t.T
    k = u.shape[-1]
    U = Phi[:, :k] * u.unsqueeze(-2)
    V = Psi[:, :k] * v.unsqueeze(-2)
    return U, V, Phi, Psi, S[:k]


def convergence_radial(
    targets: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
    *,
    lr: float = 1e-5,
    steps: int = 100_000,
    m: int = 5,
    n: int = 10,
    threshold: float = 1e-6,
    seed: int = 0,
    num_records: int = 300,
    progress: bool = False,
) -> dict[str, Any]:
    """Figure 7 / Prop. G.2: radial two-layer network from spectral inits with chosen Q = Σλᵢ.

    One spectral initialization (ūᵢ, v̄ᵢ ~ |N(1, 0.1²)|, k = m units) is moved along the
    orbit of the per-unit scaling symmetry (ūᵢ, v̄ᵢ) ↦ (cūᵢ, cv̄ᵢ), which leaves σᵢˣ = ūᵢ/v̄ᵢ and
    the loss unchanged and multiplies every λᵢ = ūᵢ² + v̄ᵢ² by c², to each target Q. Gradient
    descent with learning rate ``lr`` approximates the flow at time t = lr·step.

    Returns:
        Per target: λᵢ at the start and end (conserved), loss curve, steps to reach
        L ≤ threshold·L(0), steps/Q (constant in the gradient-flow limit), and the largest
        ratio |σᵢˣ(t) − σᵢʸ| / (|σᵢˣ(0) − σᵢʸ| e^{−t/λᵢ}) over recorded steps (≤ 1 by Prop. G.3).
    """
    if min(targets) <= 0:
        raise ValueError(
            f"radial Q = sum(u_i^2 + v_i^2) is positive: targets must be > 0, got {list(targets)}"
        )
    if lr <= 0 or steps < 1:
        raise ValueError(f"need lr > 0 and steps >= 1, got lr={lr}, steps={steps}")
    Y, u, v, c = _radial_problem(targets, m, n, seed)
    k = u.numel()
    U, V, Phi, Psi, sy = spectral_init(Y, c * u, c * v)
    lam0 = (c * u).square() + (c * v).square()  # (R, k)
    record = log_spaced_steps(steps, num_records)
    curve, sx, reach, U, V = _radial_descent(Y, U, V, Phi, Psi, lr, steps, record, threshold, progress)
    ubar = torch.diagonal(Phi.T @ U, dim1=-2, dim2=-1)[..., :k]
    vbar = torch.diagonal(Psi.T @ V, dim1=-2, dim2=-1)[..., :k]
    lam_end = ubar.square() + vbar.square()
    t = torch.tensor(record, dtype=torch.float64) * lr
    gap0 = (sx[:, :1] - sy).abs()
    bound = gap0 * torch.exp(-t.view(1, -1, 1) / lam0.unsqueeze(1))
    ratio = ((sx - sy).abs() / bound.clamp_min(1e-300)).where(bound > 1e-12, torch.zeros(()))
    l0 = curve[:, 0]
    per_q = [None if r is None else r / q for r, q in zip(reach, targets, strict=True)]
    results = {
        "targets": list(targets), "lambda0": lam0.tolist(), "lambda_final": lam_end.tolist(),
        "lambda_max_rel_drift": float(((lam_end - lam0).abs() / lam0).max()),
        "sigma_Y": sy.tolist(), "sigma_X0": sx[0, 0].tolist(),
        "initial_loss": l0.tolist(), "final_loss": curve[:, -1].tolist(),
        "steps_to_threshold": reach, "steps_per_Q": per_q, "g3_max_ratio": ratio.amax((1, 2)).tolist(),
        "steps": record, "loss": curve.tolist(), "lr": lr,
    }
    return {"results": results, "checks": _radial_checks(results)}


def _radial_problem(targets: Sequence[float], m: int, n: int, seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Y (m, n), one spectral initialization (ū, v̄ ~ |N(1, 0.1²)|, k = min(m, n) units) and the
    per-target scales c (R, 1) that move it to Q = Σλᵢ = target (λᵢ scales by c²)."""
    gen = torch.Generator().manual_seed(seed)
    Y = torch.randn(m, n, generator=gen, dtype=torch.float64)
    k = min(m, n)
    u = (1 + 0.1 * torch.randn(k, generator=gen, dtype=torch.float64)).abs()
    v = (1 + 0.1 * torch.randn(k, generator=gen, dtype=torch.float64)).abs()
    q_base = float((u.square() + v.square()).sum())
    c = torch.tensor([math.sqrt(t / q_base) for t in targets], dtype=torch.float64).view(-1, 1)
    return Y, u, v, c


def _radial_descent(
    Y: torch.Tensor, U: torch.Tensor, V: torch.Tensor, Phi: torch.Tensor, Psi: torch.Tensor, lr: float,
    steps: int, record: list[int], threshold: float, progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[int | None], torch.Tensor, torch.Tensor]:
    """Gradient descent of the radial runs: (loss curve (R, K), singular values σˣ (R, K, k) at
    the recorded steps, first step below threshold·L(0) per run, final U, final V)."""
    k = U.shape[-1]
    curves, sx_rec, first = [], [], _FirstBelow(threshold)
    with single_thread():
        for s in tqdm(range(steps + 1), desc="convergence [radial]", disable=not progress, mininterval=2.0):
            loss, gU, gV, X = _radial_loss_and_grads(Y, U, V)
            first.update(s, loss)
            if s in record:
                curves.append(loss)
                sx_rec.append(torch.diagonal(Phi.T @ X @ Psi, dim1=-2, dim2=-1)[..., :k])
            if s == steps:
                break
            U, V = U - lr * gU, V - lr * gV
    return torch.stack(curves, 1), torch.stack(sx_rec, 1), first.result(), U, V


def _radial_checks(r: dict[str, Any]) -> dict[str, Any]:
    """Prop. G.2/G.3 claims: smaller Q converges faster, steps ∝ Q, the bound, λ conserved."""
    targets, reach, l0 = r["targets"], r["steps_to_threshold"], r["initial_loss"]
    valid = [x for x in r["steps_per_Q"] if x is not None]
    reached = [reach[i] for i in sorted(range(len(targets)), key=lambda i: targets[i])]
    return {
        "smaller_Q_faster": all(x is not None for x in reached)
        and all(a < b for a, b in zip(reached, reached[1:], strict=False)),
        "steps_proportional_to_Q": bool(valid) and (max(valid) - min(valid)) <= 0.1 * max(valid),
        "prop_g3_bound_holds": max(r["g3_max_ratio"]) <= 1.0 + 1e-3,
        "lambda_conserved": r["lambda_max_rel_drift"] <= 1e-2,
        "same_initial_loss": max(l0) - min(l0) <= 1e-9 * max(1.0, max(l0)),
    }


def plot_convergence(result: dict[str, Any], path) -> None:
    """Figure 6 (one panel per activation) or Figure 7 (radial): loss against steps per Q."""
    res = result["results"]
    if "targets" in res:  # radial
        panels = {"radial (Prop. G.2)": res}
    else:
        panels = res
    fig, axes = new_figure(1, len(panels), figsize=(3.8 * len(panels), 3.2), squeeze=False)
    for ax, (title, r) in zip(axes[0], panels.items(), strict=True):
        for i, q in enumerate(r.get("Q0", r["targets"])):
            ax.plot(r["steps"], r["loss"][i], label=f"Q={round(q, 6):.3g}")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 4))
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("loss")
    fig.suptitle("Loss from initializations with different Q (paper Figs. 6-7)")
    fig.tight_layout()
    save_figure(fig, path)
