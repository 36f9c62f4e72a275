"""Distribution of Q at initialization (paper App. F, Figures 4–5, eq. 46).

For the two-layer network W = U σ(V) (U ∈ R^{m×h}, V ∈ R^{h×n}, whitened input) we sample Q
over many independent initializations, with the normalization of the paper's code and of
eq. 46,

    Q = Tr[UᵀU] − 2 Σ_{a,j} ∫₀^{V_aj} σ/σ′   (= 2 × eq. 47;  = Tr[UᵀU − VVᵀ] for σ = id).

Its expectation is E[Q] = m·h·Var(U) − 2·h·n·E[F(z)], z ~ N(0, Var(V)), F = ∫₀ σ/σ′, computed
by Gauss–Hermite quadrature. With the paper's "Xavier" variances 1/fan_in (Var U = 1/h,
Var V = 1/n) the linear case gives E[Q] = m − h (eq. 46).

Note: eq. 44 writes Q with a factor ½ and eq. 45 gives V the variance 1/h; the stated mean
m − h holds for Q = Tr[UᵀU − VVᵀ] with Var V = 1/n (the text's "inverse of the layer's input
dimension" and the paper's code), which is what is computed here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..plotting import new_figure, save_figure
from ..symmetry.activations import create_activation
from ..symmetry.elementwise import antiderivative_sigma_over_dsigma

__all__ = [
    "INITS",
    "DEFAULT_CONFIGS",
    "parse_config",
    "init_variances",
    "expected_antiderivative",
    "expected_q",
    "sample_q",
    "q_distribution",
    "plot_q_distribution",
]

log = logging.getLogger(__name__)

#: Initializations: name → description. Variances are per layer with fan_in/fan_out of the
#: layer (U: fan_in h, fan_out m; V: fan_in n, fan_out h).
INITS = {
    "xavier": "N(0, 1/fan_in) — the paper's 'Xavier' (eq. 45 text; LeCun normal)",
    "glorot": "N(0, 2/(fan_in + fan_out)) — Glorot & Bengio normal",
    "kaiming": "N(0, 2/fan_in) — He/Kaiming normal",
}

_POINTWISE = ("identity", "relu", "leaky_relu", "tanh", "sigmoid")

#: (m, h, n, activation): Figure 4 (linear, three shapes) and Figure 5 (nonlinear, 100³).
DEFAULT_CONFIGS: tuple[tuple[int, int, int, str], ...] = (
    (100, 100, 100, "identity"),
    (100, 200, 100, "identity"),
    (200, 100, 100, "identity"),
    (100, 100, 100, "relu"),
    (100, 100, 100, "tanh"),
    (100, 100, 100, "sigmoid"),
)


def parse_config(text: str) -> tuple[int, int, int, str]:
    """``"m,h,n,activation"`` (e.g. ``"100,200,100,identity"``) as a configuration tuple.

    Raises:
        ValueError: not four fields, non-integer or non-positive widths, or an activation
            other than identity, relu, leaky_relu, tanh, sigmoid.
    """
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4:
        raise ValueError(f"expected m,h,n,activation (e.g. 100,200,100,identity), got {text!r}")
    try:
        m, h, n = (int(p) for p in parts[:3])
    except ValueError:
        raise ValueError(f"m, h, n must be integers, got {text!r}") from None
    if min(m, h, n) < 1:
        raise ValueError(f"m, h, n must be positive, got {text!r}")
    if parts[3] not in _POINTWISE:
        raise ValueError(f"activation must be one of {list(_POINTWISE)}, got {parts[3]!r}")
    return (m, h, n, parts[3])


def init_variances(init: str, m: int, h: int, n: int) -> tuple[float, float]:
    """(Var U, Var V) of an initialization for U ∈ R^{m×h}, V ∈ R^{h×n}."""
    if init == "xavier":
        return 1.0 / h, 1.0 / n
    if init == "glorot":
        return 2.0 / (h + m), 2.0 / (n + h)
    if init == "kaiming":
        return 2.0 / h, 2.0 / n
    raise ValueError(f"unknown init {init!r}; expected one of {sorted(INITS)}")


def expected_antiderivative(act: str, var: float, nodes: int = 80) -> float:
    """E[F(z)] for z ~ N(0, var), F(v) = ∫₀^v σ/σ′, by Gauss–Hermite quadrature (float64)."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    z = torch.as_tensor(x * math.sqrt(var), dtype=torch.float64)
    F = antiderivative_sigma_over_dsigma(act, z)
    return float((torch.as_tensor(w) * F).sum()) / math.sqrt(2 * math.pi)


def expected_q(act: str, m: int, h: int, n: int, init: str = "xavier") -> float:
    """E[Q] = m·h·Var(U) − 2·h·n·E[F(z)]; equals m − h for σ = id under ``"xavier"`` (eq. 46)."""
    var_u, var_v = init_variances(init, m, h, n)
    return m * h * var_u - 2 * h * n * expected_antiderivative(act, var_v)


def sample_q(
    act: str,
    m: int,
    h: int,
    n: int,
    init: str = "xavier",
    *,
    samples: int = 1000,
    generator: torch.Generator | None = None,
    chunk: int = 50,
) -> torch.Tensor:
    """Q = Tr[UᵀU] − 2 Σ F(V) over independent initializations (vectorized in chunks).

    Shape:
        (samples,), float64.
    """
    var_u, var_v = init_variances(init, m, h, n)
    out = []
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        U = torch.randn(k, m, h, generator=generator, dtype=torch.float64) * math.sqrt(var_u)
        V = torch.randn(k, h, n, generator=generator, dtype=torch.float64) * math.sqrt(var_v)
        F = antiderivative_sigma_over_dsigma(act, V)
        out.append(U.square().sum((1, 2)) - 2 * F.sum((1, 2)))
    return torch.cat(out)


def q_distribution(
    configs: Sequence[tuple[int, int, int, str]] = DEFAULT_CONFIGS,
    inits: Sequence[str] = ("xavier", "kaiming"),
    *,
    samples: int = 1000,
    seed: int = 0,
    bins: int = 30,
    progress: bool = False,
) -> dict[str, Any]:
    """Figures 4–5: sample Q for each (m, h, n, σ) and initialization and compare with E[Q].

    Returns:
        ``{"results": [...], "checks": {...}}``: per configuration the sample mean, standard
        deviation, standard error, E[Q], the z-score (mean − E[Q])/SE, the paper's m − h (linear,
        xavier) and a histogram.
    """
    if samples < 2:
        raise ValueError(f"samples must be >= 2, got {samples}")
    for init in inits:
        init_variances(init, 1, 1, 1)
    results = []
    jobs = [(init, cfg) for init in inits for cfg in configs]
    for idx, (init, (m, h, n, act)) in enumerate(tqdm(jobs, desc="q distribution", disable=not progress)):
        create_activation(act)
        gen = torch.Generator().manual_seed(seed * 1000 + idx)
        q = sample_q(act, m, h, n, init, samples=samples, generator=gen)
        results.append(_q_summary(q, init, m, h, n, act, bins))
        log.info("Q %s %s (m,h,n)=(%d,%d,%d): mean %.4g vs E %.4g (z=%.2f)", init, act, m, h, n,
                 results[-1]["mean"], results[-1]["expected"], results[-1]["z"])
    checks = {
        "all_within_3se": all(r["within_3se"] for r in results),
        "max_abs_z": max(abs(r["z"]) for r in results),
    }
    return {"results": results, "checks": checks}


def _q_summary(q: torch.Tensor, init: str, m: int, h: int, n: int, act: str, bins: int) -> dict[str, Any]:
    """One configuration's row: sample mean, std, standard error, E[Q], z-score, histogram."""
    samples = q.numel()
    mean, std = float(q.mean()), float(q.std())
    se = std / math.sqrt(samples)
    expected = expected_q(act, m, h, n, init)
    z = (mean - expected) / se if se > 0 else 0.0
    counts, edges = np.histogram(q.numpy(), bins=bins)
    return {
        "init": init, "m": m, "h": h, "n": n, "activation": act, "samples": samples,
        "mean": mean, "std": std, "stderr": se, "expected": expected, "z": z,
        "within_3se": abs(z) <= 3.0,
        "paper_m_minus_h": (m - h) if (act == "identity" and init == "xavier") else None,
        "hist_counts": counts.tolist(), "hist_edges": edges.tolist(),
    }


def plot_q_distribution(result: dict[str, Any], path) -> None:
    """Histograms of Q (rows: initializations; columns: configurations) with E[Q] and the mean."""
    rows = list(dict.fromkeys(r["init"] for r in result["results"]))
    cols = list(dict.fromkeys((r["m"], r["h"], r["n"], r["activation"]) for r in result["results"]))
    fig, axes = new_figure(len(rows), len(cols), figsize=(3.1 * len(cols), 2.6 * len(rows)), squeeze=False)
    for r in result["results"]:
        ax = axes[rows.index(r["init"]), cols.index((r["m"], r["h"], r["n"], r["activation"]))]
        edges = np.asarray(r["hist_edges"])
        ax.bar(
            (edges[1:] + edges[:-1]) / 2,
            r["hist_counts"],
            width=edges[1] - edges[0],
            color="tab:blue",
            alpha=0.7,
        )
        ax.axvline(r["expected"], color="k", ls="--", lw=1, label="E[Q]")
        ax.axvline(r["mean"], color="tab:red", lw=1, label="mean")
        ax.set_title(f"{r['activation']} (m,h,n)=({r['m']},{r['h']},{r['n']})\n{r['init']}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("Q", fontsize=8)
    fig.suptitle("Q at initialization (paper Figs. 4-5)")
    fig.tight_layout()
    save_figure(fig, path)
