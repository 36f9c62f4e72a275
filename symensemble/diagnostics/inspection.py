"""Conserved quantities and symmetry facts of a trained model's head (``symensemble q inspect``).

The head F(e) = U σ(V e + b_V) + b_U of every symensemble model is a two-layer stack with one
hidden layer of width h, on which the linear symmetry group of σ acts (eq. 22). This module
reports, per hidden unit k, Q_k = |V_k|² + b_k² − α|U_{:,k}|² (Example 5.3), or the whole
matrix μ = VVᵀ + bbᵀ − UᵀU for a linear head (Example 5.2), with the orbit dimension.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..plotting import new_figure, save_figure
from ..symmetry.conserved import imbalance, unit_q, unit_q_terms
from ..symmetry.groups import group_kind_for_activation
from ..symmetry.linear import LinearSymmetry
from ..symmetry.module_bridge import module_layers
from ..symmetry.orbits import orbit_dimension_formula, paper_orbit_dimension
from ..symmetry.stack import StackParams

__all__ = ["head_stack", "head_q_summary", "inspect_model", "plot_inspection"]


def head_stack(model: nn.Module) -> tuple[StackParams, Any]:
    """θ = (V, b_V, U, b_U) of the model's head in float64, and its activation σ.

    The head is found by the one head finder (:func:`~symensemble.symmetry.heads.find_head`,
    through :func:`~symensemble.symmetry.module_bridge.module_layers`).

    Raises:
        ValueError: the model has no SymHead (or is not a SymHead/MLP with one hidden layer).
    """
    linears, acts = module_layers(model)
    if len(acts) != 1:
        raise ValueError(f"expected one hidden layer (a SymHead), found {len(acts)}")
    return StackParams.from_linears(linears, dtype=torch.float64), acts[0]


def head_q_summary(model: nn.Module) -> dict[str, Any]:
    """The conserved quantity of the head, JSON-ready.

    Keys: ``activation``, ``group`` (or None), ``conserved`` (bool), ``per_unit`` (Q_k, the
    diagonal of μ with the α weight), ``total`` (Σ_k Q_k) and, for a linear head,
    ``matrix`` (μ). For sigmoid/tanh heads (no linear symmetry) and radial heads (𝔰𝔬_h has no
    symmetric elements) ``conserved`` is False and the α = 1 diagonal is still reported.
    """
    params, act = head_stack(model)
    try:
        kind, alpha = group_kind_for_activation(act)
    except ValueError:
        kind, alpha = None, 1.0
    row, col = unit_q_terms(params)
    per_unit = unit_q(params, alpha)
    group = None if kind is None else LinearSymmetry.for_activations([act], [row.numel()]).groups[0].name
    out: dict[str, Any] = {
        "activation": act.config(),
        "group": group,
        "alpha": alpha,
        "conserved": kind in ("gl", "scaling"),
        "per_unit": per_unit.tolist(),
        "total": float(per_unit.sum()),
        "row_norm2": row.tolist(),
        "col_norm2": col.tolist(),
    }
    if kind == "gl":
        out["matrix"] = imbalance(params)[0].tolist()
    if kind is None:
        out["note"] = f"{act.name!r} has no continuous linear symmetry: no conserved Q_M"
    elif kind == "orthogonal":
        out["note"] = (
            "radial head: O(h) has no symmetric Lie-algebra elements; the conserved "
            "structure is the angular momentum (Theorem 5.2)"
        )
    return out


def inspect_model(model: nn.Module) -> dict[str, Any]:
    """Q of every hidden layer (the head's) plus the symmetry group and orbit dimension."""
    params, act = head_stack(model)
    n, h, m = params.widths
    summary = head_q_summary(model)
    info: dict[str, Any] = {
        "widths": {"in_features": n, "hidden": h, "num_classes": m},
        "layers": [summary],
    }
    try:
        kind, _ = group_kind_for_activation(act)
    except ValueError:
        kind = None
    if kind is not None:
        sym = LinearSymmetry.for_activations([act], [h])
        info["symmetry"] = {
            "group": sym.groups[0].name,
            "group_dim": sym.dim,
            "orbit_dim": sym.orbit_dimension(params, method="gram"),
            "orbit_dim_formula": orbit_dimension_formula(kind, n, h, m, bias=params.biases[0] is not None),
            "orbit_dim_paper_table": paper_orbit_dimension(kind, n, h, m),
        }
    else:
        info["symmetry"] = {"group": None, "group_dim": 0, "orbit_dim": 0}
    return info


def plot_inspection(info: dict[str, Any], path, title: str = "") -> None:
    """Bar chart of Q_k per hidden unit with its two terms."""
    layer = info["layers"][0]
    h = len(layer["per_unit"])
    k = torch.arange(h).numpy()
    fig, ax = new_figure(figsize=(max(5.0, 0.35 * h + 2), 3.2))
    ax.bar(k - 0.27, layer["row_norm2"], width=0.27, label=r"$|V_k|^2 + b_k^2$")
    ax.bar(
        k,
        [layer["alpha"] * c for c in layer["col_norm2"]],
        width=0.27,
        label=r"$\alpha|U_{:,k}|^2$",
    )
    ax.bar(k + 0.27, layer["per_unit"], width=0.27, label=r"$Q_k$")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("hidden unit k")
    ax.legend(fontsize=7)
    group = layer["group"] or "no linear symmetry"
    ax.set_title(
        f"{title} head Q per unit ({layer['activation']['name']}, {group}); total {layer['total']:.4g}",
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, path)
