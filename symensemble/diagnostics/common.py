"""Shared pieces of the Q diagnostics: the paper's two-layer problem, integrators, result files.

The experiments of App. E–H use a two-layer network with whitened input (X = I), so the
network output is the matrix W = U σ(V) with U ∈ R^{m×h} and V ∈ R^{h×n} (the paper's code
stores Vᵀ), fitted to a random target Y ∈ R^{m×n}. :class:`TwoLayerProblem` evaluates its loss
and closed-form gradients batched over independent runs (a leading dimension), so learning
rates or initializations train side by side in one vectorized loop.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..io import write_json
from ..runtime import provenance
from ..symmetry.activations import Activation, create_activation

__all__ = [
    "TwoLayerProblem",
    "dsigma",
    "sigma_derivatives",
    "rk4_step",
    "gradient_flow",
    "log_spaced_steps",
    "run_header",
    "write_result",
]

_REDUCTIONS = ("mean", "sum", "half")


def dsigma(act: Activation, z: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
    """σ′(z) elementwise: closed form for the registry's pointwise activations, else autograd.

    Args:
        act: a pointwise activation.
        z: pre-activations (any shape).
        create_graph: keep σ′(z) differentiable in ``z`` (which must then require grad), so that
            σ″ = ∂σ′/∂z can be taken by autograd (:func:`sigma_derivatives`).

    Raises:
        ValueError: a non-pointwise activation without a closed form.
    """
    name = act.name
    if name == "identity":
        return torch.ones_like(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "leaky_relu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, act.negative_slope))  # type: ignore[attr-defined]
    if name == "tanh":
        return 1 - torch.tanh(z).square()
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    if not act.pointwise:
        raise ValueError(f"sigma' elementwise needs a pointwise activation, got {act.name!r}")
    x = z if create_graph else z.detach().requires_grad_(True)
    with torch.enable_grad():
        (d,) = torch.autograd.grad(act(x).sum(), x, create_graph=create_graph)
    return d


def sigma_derivatives(act: Activation, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(σ(z), σ′(z), σ″(z)) elementwise and detached; σ′ from :func:`dsigma`, σ″ by autograd.

    σ″ is zero where σ′ is piecewise constant (identity, ReLU, LeakyReLU).
    """
    x = z.detach().requires_grad_(True)
    with torch.enable_grad():
        d1 = dsigma(act, x, create_graph=True)
        d2 = torch.autograd.grad(d1.sum(), x, allow_unused=True)[0] if d1.requires_grad else None
    s = act(z.detach())
    return s, d1.detach(), torch.zeros_like(s) if d2 is None else d2.detach()


@dataclass(frozen=True)
class TwoLayerProblem:
    """Fit W = U σ(V) to Y with whitened input (eqs. 43, 56, 80).

    Attributes:
        Y: target (m, n).
        act: pointwise hidden activation σ.
        reduction: ``"mean"`` — ‖Y − W‖²/(mn), as ``nn.MSELoss`` in the paper's code;
            ``"sum"`` — ‖Y − W‖², eqs. 43 and 80; ``"half"`` — ½‖Y − W‖², Prop. G.1 and App. H.1.

    Shape:
        U (R, m, h) and V (R, h, n) for R runs side by side (a leading dim is required).
    """

    Y: torch.Tensor
    act: Activation
    reduction: str = "mean"

    def __post_init__(self) -> None:
        if self.reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {self.reduction!r}")
        if self.Y.ndim != 2:
            raise ValueError(f"Y must be a matrix (m, n), got shape {tuple(self.Y.shape)}")
        object.__setattr__(self, "act", create_activation(self.act))
        if not self.act.pointwise:
            raise ValueError(f"TwoLayerProblem needs a pointwise activation, got {self.act.name!r}")

    @classmethod
    def random(cls, act: str | Activation, m: int, n: int, h: int, init_std: float, seed: int,
               reduction: str = "mean") -> tuple[TwoLayerProblem, torch.Tensor, torch.Tensor]:
        """A Gaussian target Y (m, n) and initialization U0 (m, h), V0 (h, n) with std
        ``init_std``, all float64 from one generator seeded with ``seed`` (the paper's setup)."""
        gen = torch.Generator().manual_seed(seed)
        Y = torch.randn(m, n, generator=gen, dtype=torch.float64)
        U0 = torch.randn(m, h, generator=gen, dtype=torch.float64) * init_std
        V0 = torch.randn(h, n, generator=gen, dtype=torch.float64) * init_std
        return cls(Y, act, reduction), U0, V0

    @property
    def coef(self) -> float:
        """c with L = c‖Y − W‖²."""
        m, n = self.Y.shape
        return {"mean": 1.0 / (m * n), "sum": 1.0, "half": 0.5}[self.reduction]

    def output(self, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """W = U σ(V), shape (R, m, n)."""
        return U @ self.act(V)

    def loss(self, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """L per run, shape (R,)."""
        return self.coef * (self.output(U, V) - self.Y).square().sum((-2, -1))

    def loss_and_grads(
        self, U: torch.Tensor, V: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L, ∂L/∂U, ∂L/∂V) in closed form.

        ∂L/∂U = G σ(V)ᵀ and ∂L/∂V = (UᵀG) ⊙ σ′(V) with G = 2c(W − Y).
        """
        S = self.act(V)
        R = U @ S - self.Y
        G = (2 * self.coef) * R
        loss = self.coef * R.square().sum((-2, -1))
        return loss, G @ S.transpose(-1, -2), (U.transpose(-1, -2) @ G) * dsigma(self.act, V)


def rk4_step(grad: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dt: float) -> torch.Tensor:
    """One classical Runge–Kutta step of the gradient flow ẋ = −∇L(x) (eq. 10)."""
    k1 = grad(x)
    k2 = grad(x - (0.5 * dt) * k1)
    k3 = grad(x - (0.5 * dt) * k2)
    k4 = grad(x - dt * k3)
    return x - (dt / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)


def gradient_flow(
    grad: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    dt: float,
    steps: int,
    *,
    method: str = "rk4",
    every: int = 1,
) -> torch.Tensor:
    """Integrate ẋ = −∇L(x) from x0 and return the states at t = 0, every·dt, ….

    Args:
        grad: x ↦ ∇L(x) on flat vectors.
        x0: initial point (d,).
        dt: time step.
        steps: number of steps.
        method: ``"rk4"`` (error O(dt⁴) on smooth losses) or ``"euler"`` (gradient descent
            with learning rate dt).
        every: keep one state in ``every``.

    Shape:
        (steps // every + 1, d).
    """
    if method not in ("rk4", "euler"):
        raise ValueError(f"method must be 'rk4' or 'euler', got {method!r}")
    if steps < 0 or every < 1:
        raise ValueError(f"need steps >= 0 and every >= 1, got steps={steps}, every={every}")
    states = [x0]
    x = x0
    for k in range(1, steps + 1):
        x = rk4_step(grad, x, dt) if method == "rk4" else x - dt * grad(x)
        if k % every == 0:
            states.append(x)
    return torch.stack(states)


def log_spaced_steps(total: int, num: int = 400) -> list[int]:
    """About ``num`` distinct step indices in [0, total], dense near 0 and including both ends."""
    if total <= num:
        return list(range(total + 1))
    lin = torch.linspace(0, total, num // 2).round().long().tolist()
    log = torch.logspace(0, math.log10(total), num // 2).round().long().tolist()
    return sorted({0, total, *lin, *log})


# ----------------------------------------------------------------------------------------------
# Result files
# ----------------------------------------------------------------------------------------------


def run_header(command: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Provenance written with every result: command, settings, versions, git revision,
    command line (:func:`symensemble.runtime.provenance`)."""
    return {"command": command, "settings": dict(settings), **provenance()}


def write_result(
    json_path: str | os.PathLike,
    header: Mapping[str, Any],
    result: Mapping[str, Any],
    plot: Callable[[Mapping[str, Any], Path], None] | None = None,
) -> tuple[Path, Path | None]:
    """Write ``{**header, **result}`` as JSON and, with ``plot``, the figure beside it as .png.

    Returns:
        (json path, png path or None).
    """
    json_path = write_json(json_path, {**header, **result})
    if plot is None:
        return json_path, None
    png_path = json_path.with_suffix(".png")
    plot(result, png_path)
    return json_path, png_path
