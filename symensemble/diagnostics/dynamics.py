"""Q during gradient descent (paper App. E, Figure 3, Proposition E.1).

Gradient flow conserves Q exactly; gradient descent with learning rate η changes it by O(η²)
per step. :func:`q_dynamics` trains the two-layer whitened-input network of eq. 43 with
several learning rates side by side and records

    ΔQ̃(t) = Q̃(t) − Q̃(0),   Q̃ = |f₁(U) − f₂(V)| / (|f₁(U₀)| + |f₂(V₀)|)   (eq. 42),

with f₁ = ½ Tr UᵀU and f₂ = Σ ∫₀^{V_aj} σ/σ′ (eq. 47). For the linear network it also checks
Proposition E.1 at every step: with Q = Tr[UᵀU − VVᵀ],

    Q_{t+1} − Q_t = η² (‖∂L/∂U‖² − ‖∂L/∂V‖²),   so   |Q_{t+1} − Q_t| ≤ η² ‖∇L(θ_t)‖² = η² |dL/dt|.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..plotting import new_figure, save_figure
from ..runtime import single_thread
from ..symmetry.elementwise import elementwise_q_terms
from .common import TwoLayerProblem, log_spaced_steps

__all__ = ["DEFAULT_ACTIVATIONS", "DEFAULT_LRS", "q_dynamics", "plot_q_dynamics"]

log = logging.getLogger(__name__)

DEFAULT_ACTIVATIONS = ("identity", "relu", "sigmoid", "tanh")
DEFAULT_LRS = (0.1, 0.01, 0.001)


class _PropE1:
    """Running check of Prop. E.1 on the linear network, every step, for R runs side by side.

    With Q = Tr[UᵀU − VVᵀ], one step changes Q by η²(‖∂L/∂U‖² − ‖∂L/∂V‖²) (eq. 40), so
    |ΔQ| ≤ η²‖∇L‖²; violations are counted beyond a rounding allowance of 64·eps·(‖U‖² + ‖V‖²).
    """

    def __init__(self, lr2: torch.Tensor) -> None:
        self.lr2 = lr2
        self.ratio = torch.zeros_like(lr2)
        self.violations = torch.zeros(lr2.shape, dtype=torch.long)
        self.identity_err = torch.zeros_like(lr2)
        self.eps = torch.finfo(lr2.dtype).eps

    def update(self, q_before: torch.Tensor, nU: torch.Tensor, nV: torch.Tensor, U: torch.Tensor,
               V: torch.Tensor) -> None:
        """Account one step that moved Q from ``q_before`` to that of (U, V), with squared
        gradient norms nU, nV taken before the step."""
        step_dq = (U.square().sum((-2, -1)) - V.square().sum((-2, -1))) - q_before
        bound = self.lr2 * (nU + nV)
        roundoff = 64 * self.eps * (U.square().sum((-2, -1)) + V.square().sum((-2, -1)))
        self.violations += (step_dq.abs() > bound + roundoff).long()
        meaningful = bound > roundoff
        ratio = torch.where(meaningful, step_dq.abs() / bound.clamp_min(1e-300), 0.0)
        self.ratio = torch.maximum(self.ratio, ratio)
        # eq. 40 is an identity; measured where it is not drowned in rounding of Q itself
        resolved = bound > 1e4 * roundoff
        id_err = (step_dq - self.lr2 * (nU - nV)).abs() / bound.clamp_min(1e-300)
        self.identity_err = torch.maximum(self.identity_err, torch.where(resolved, id_err, 0.0))

    def result(self, steps: int) -> dict[str, Any]:
        return {
            "statement": "|Q_{t+1} - Q_t| <= lr^2 |dL/dt| with Q = Tr[U^T U - V V^T], every step",
            "max_ratio": self.ratio.tolist(),
            "violations": self.violations.tolist(),
            "max_identity_error": self.identity_err.tolist(),  # |dQ - lr^2(|gU|^2-|gV|^2)|/bound
            "steps_checked": steps,
            "holds": bool((self.violations == 0).all()),
        }


def _train_one(
    problem: TwoLayerProblem,
    U0: torch.Tensor,
    V0: torch.Tensor,
    lrs: Sequence[float],
    steps: int,
    num_records: int,
    progress: bool,
) -> dict[str, Any]:
    act = problem.act
    R = len(lrs)
    U = U0.expand(R, *U0.shape).clone()
    V = V0.expand(R, *V0.shape).clone()
    lr = torch.tensor(lrs, dtype=U0.dtype).view(R, 1, 1)
    f1_0, f2_0 = elementwise_q_terms(U0, V0, act)
    norm = f1_0.abs() + f2_0.abs()
    qt0 = (f1_0 - f2_0).abs() / norm
    record = set(log_spaced_steps(steps, num_records))
    rec_steps: list[int] = []
    rec_loss: list[torch.Tensor] = []
    rec_dq: list[torch.Tensor] = []
    max_abs_dq = torch.zeros(R, dtype=U0.dtype)
    e1 = _PropE1(lr.view(R).square()) if act.name == "identity" else None
    for t in tqdm(range(steps + 1), desc=f"q dynamics [{act.name}]", disable=not progress, mininterval=2.0):
        loss, gU, gV = problem.loss_and_grads(U, V)
        f1, f2 = elementwise_q_terms(U, V, act)
        dq = (f1 - f2).abs() / norm - qt0
        max_abs_dq = torch.maximum(max_abs_dq, dq.abs())
        if t in record:
            rec_steps.append(t)
            rec_loss.append(loss)
            rec_dq.append(dq)
        if t == steps:
            break
        if e1 is not None:
            nU, nV = gU.square().sum((-2, -1)), gV.square().sum((-2, -1))
            q_before = 2 * (f1 - 0.5 * V.square().sum((-2, -1)))  # Tr UᵀU − Tr VVᵀ
        U = U - lr * gU
        V = V - lr * gV
        if e1 is not None:
            e1.update(q_before, nU, nV, U, V)
    out: dict[str, Any] = {
        "lr": list(lrs),
        "steps": rec_steps,
        "loss": torch.stack(rec_loss, 1).tolist(),  # (num lrs, num steps)
        "dQ_tilde": torch.stack(rec_dq, 1).tolist(),  # (num lrs, num steps)
        "initial_loss": float(rec_loss[0][0]),
        "final_loss": rec_loss[-1].tolist(),
        "final_dQ_tilde": rec_dq[-1].tolist(),
        "max_abs_dQ_tilde": max_abs_dq.tolist(),
        "Q0": float(f1_0 - f2_0),
        "f1_0": float(f1_0),
        "f2_0": float(f2_0),
    }
    if e1 is not None:
        out["prop_e1"] = e1.result(steps)
    return out


def q_dynamics(
    activations: Sequence[str] = DEFAULT_ACTIVATIONS,
    lrs: Sequence[float] = DEFAULT_LRS,
    *,
    steps: int = 100_000,
    m: int = 5,
    n: int = 10,
    h: int = 50,
    init_std: float = 0.1,
    reduction: str = "mean",
    seed: int = 0,
    num_records: int = 400,
    progress: bool = False,
) -> dict[str, Any]:
    """Figure 3: ΔQ̃(t) and the loss under gradient descent for each activation and learning rate.

    Y ~ N(0, 1) (m × n), U, V ~ N(0, init_std²) with (m, h, n) = (5, 50, 10) as in the paper,
    the same initialization for every learning rate; float64.

    Args:
        activations: pointwise activations (eq. 47 needs σ′ ≠ 0 where V lives).
        lrs: learning rates, trained side by side.
        steps: gradient-descent steps (the paper: 400k; 800k for sigmoid).
        m, h, n: output, hidden and input widths.
        init_std: standard deviation of the initial entries.
        reduction: loss normalization (:class:`TwoLayerProblem`); ``"mean"`` as the paper's code.
        seed: seed of Y and the initialization.
        num_records: about how many (log- and linearly spaced) steps to keep in the curves.
        progress: show a tqdm bar.

    Returns:
        ``{"results": {act: {...}}, "checks": {...}}`` — per activation the recorded curves,
        final loss, max |ΔQ̃| per learning rate and, for ``identity``, the Prop. E.1 check.
    """
    if not lrs or min(lrs) <= 0:
        raise ValueError(f"learning rates must be positive, got {list(lrs)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    results: dict[str, Any] = {}
    for name in activations:
        problem, U0, V0 = TwoLayerProblem.random(name, m, n, h, init_std, seed, reduction)
        with single_thread():
            results[name] = _train_one(problem, U0, V0, lrs, steps, num_records, progress)
        log.info("q dynamics %s: max|dQ~| %s", name, results[name]["max_abs_dQ_tilde"])
    order = sorted(range(len(lrs)), key=lambda i: lrs[i])
    checks: dict[str, Any] = {"max_abs_dQ_tilde": {}, "grows_with_lr": {}, "loss_decreased": {}}
    for name, res in results.items():
        mx = res["max_abs_dQ_tilde"]
        checks["max_abs_dQ_tilde"][name] = max(mx)
        checks["grows_with_lr"][name] = all(mx[a] <= mx[b] for a, b in zip(order, order[1:], strict=False))
        checks["loss_decreased"][name] = all(f < res["initial_loss"] for f in res["final_loss"])
    if "identity" in results:
        checks["prop_e1_holds"] = results["identity"]["prop_e1"]["holds"]
    return {"results": results, "checks": checks}


def plot_q_dynamics(result: dict[str, Any], path) -> None:
    """Figure 3: ΔQ̃ (top) and loss (bottom) against steps, one column per activation."""
    names = list(result["results"])
    fig, axes = new_figure(2, len(names), figsize=(3.6 * len(names), 5.2), sharex="col", squeeze=False)
    for j, name in enumerate(names):
        res = result["results"][name]
        steps = res["steps"]
        for i, lr in enumerate(res["lr"]):
            axes[0, j].plot(steps, res["dQ_tilde"][i], label=f"lr={lr:g}")
            axes[1, j].plot(steps, res["loss"][i], label=f"lr={lr:g}")
        axes[0, j].set_title(name)
        axes[1, j].set_yscale("log")
        axes[1, j].set_xlabel("training step")
        axes[0, j].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        axes[1, j].ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    axes[0, 0].set_ylabel(r"$\Delta\tilde{Q}$")
    axes[1, 0].set_ylabel("loss")
    axes[1, -1].legend(fontsize=8)
    fig.suptitle("Conserved quantity under gradient descent (paper Fig. 3)")
    save_figure(fig, path)
