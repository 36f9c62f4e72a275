"""Figures of an :class:`~symensemble.robustness.records.EvaluationResult`.

* :func:`plot_accuracy` — accuracy against eps (or steps), one panel per threat model
  (the paper's Figure 11, with the adaptive panel beside it and 95% Wilson bands).
* :func:`plot_delta_heatmap` — accuracy minus the base model's over num_members × ensemble eps
  (the paper's Figure 10; red = worse than the base model).

Figures are drawn with matplotlib's Agg canvas directly (no pyplot state, no display needed).
"""

from __future__ import annotations

from typing import Any

from ...plotting import new_figure
from ...vocab import ORIGINAL, ROBUST, WHITEBOX, WORST, format_eps
from ..records import EvaluationResult, Record
from .tables import PORTFOLIO, strength_order, threat_label

__all__ = ["plot_accuracy", "plot_delta_heatmap"]

_COLORS = ["tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown",
           "tab:pink", "tab:olive", "tab:cyan"]


def _accuracy_lines(sel: list[Record], xkey: str, step_values: list | None
                    ) -> list[tuple[str, str, tuple[list, list, list, list]]]:
    """The lines to draw for ``sel``: (label suffix, line style, (x, accuracy, lo, hi)).

    One line, or with ``step_values`` one line per step count (labelled ``(steps=k)``), so
    points with different step counts are never joined.
    """
    styles = ["-", "--", ":", "-."]
    groups = ([(f" (steps={v})", styles[n % len(styles)], [r for r in sel if r.steps == v])
               for n, v in enumerate(step_values)] if step_values else [("", "-", sel)])
    out = []
    for suffix, style, group in groups:
        group = sorted(group, key=lambda r: getattr(r, xkey))
        if group:
            out.append((suffix, style, ([getattr(r, xkey) for r in group],
                                        [r.accuracy for r in group],
                                        [r.ci_low for r in group], [r.ci_high for r in group])))
    return out


def _draw(ax: Any, lines: list, color: str, lw: float, alpha: float, label: str) -> None:
    """Each (suffix, style, (x, accuracy, lo, hi)) of :func:`_accuracy_lines` with its band."""
    for suffix, style, (xs, ys, lo, hi) in lines:
        ax.plot(xs, ys, "o" + style, color=color, lw=lw, label=f"{label}{suffix}")
        ax.fill_between(xs, lo, hi, color=color, alpha=alpha, lw=0)


def _accuracy_panel(ax: Any, recs: list[Record], threat: str, transforms: list[str],
                    g: int | None, e: float | None, portfolio: bool) -> str:
    """One panel: the base model in black and each transform's ensembles; returns the x key."""
    use_steps = len({r.eps for r in recs}) == 1 and len({r.steps for r in recs}) > 1
    xkey = "steps" if use_steps else "eps"
    # a grid over eps and steps: one line per step count, never joining different ones
    split = sorted({r.steps for r in recs}, key=lambda v: (v is None, v or 0)) \
        if not use_steps and len({r.steps for r in recs}) > 1 else None
    base = [r for r in recs if r.transform == ORIGINAL and r.threat in (WHITEBOX, ROBUST)]
    _draw(ax, _accuracy_lines(base, xkey, split), "black", 2.2, 0.12,
          f"original ({'robust' if portfolio else 'white-box'})")
    for k, transform in enumerate(transforms):
        sel = [r for r in recs if r.transform == transform and r.threat == threat
               and r.num_members == g and r.ensemble_eps == e]
        _draw(ax, _accuracy_lines(sel, xkey, split), _COLORS[k % len(_COLORS)], 1.8, 0.15,
              transform)
    return xkey


def plot_accuracy(result: EvaluationResult, *, num_members: int | None = None,
                  ensemble_eps: float | None = None):
    """Accuracy against attack strength (Figure 11 style), one panel per threat model.

    The x axis is eps, or steps when an attack has a single eps and several step counts;
    a grid over several eps and step counts gets one line per step count.
    The base model (white-box) is drawn in black in every panel; bands are 95% Wilson
    intervals. In sweeps the ensembles of size ``num_members`` and radius ``ensemble_eps``
    are drawn (default: the first of each list).

    Returns:
        A matplotlib ``Figure``.
    """
    settings = result.settings
    g = num_members if num_members is not None else (settings.get("num_members") or [None])[0]
    e = ensemble_eps if ensemble_eps is not None else (settings.get("ensemble_eps") or [None])[0]
    portfolio = any(r.attack == PORTFOLIO for r in result.records)
    threats = [ROBUST] if portfolio else list(settings.get("threat") or ["transfer", "adaptive"])
    if any(r.threat == WORST for r in result.records):
        threats.append(WORST)
    attacks = list(dict.fromkeys(r.attack for r in result.records))
    transforms = [t for t in settings.get("transforms", []) if t != ORIGINAL]
    fig, axes = new_figure(len(attacks), max(len(threats), 1),
                           figsize=(5.2 * max(len(threats), 1), 4.0 * len(attacks)),
                           squeeze=False, sharey=True)
    for i, attack in enumerate(attacks):
        recs = [r for r in result.records if r.attack == attack]
        for j, threat in enumerate(threats):
            ax = axes[i][j]
            xkey = _accuracy_panel(ax, recs, threat, transforms, g, e, portfolio)
            ax.set_xlabel(f"{attack.upper()} {'iterations' if xkey == 'steps' else 'epsilon'}")
            if j == 0:
                ax.set_ylabel("accuracy")
            shown = threat_label(threat)
            ax.set_title(f"{shown} ({attack}; ensembles G={g}, ε={e:g})" if g is not None
                         else f"{shown} ({attack})", fontsize=10)
            ax.grid(alpha=0.3)
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=8)
    return fig


def _heatmap_strength(result: EvaluationResult, attack: str | None, eps: float | None,
                      steps: int | None, threat: str | None) -> tuple[str, float, Any, str]:
    """The (attack, eps, steps, threat) a heatmap shows: the given ones, else the defaults."""
    attack = attack or result.records[0].attack
    recs = [r for r in result.records if r.attack == attack]
    if eps is None:
        eps, default_steps = strength_order(recs)[0]
        steps = default_steps if steps is None else steps
    elif steps is None:
        candidates = sorted({r.steps for r in recs if r.eps == eps}, key=lambda s: s or 0)
        steps = candidates[0] if candidates else None
    threats = [ROBUST] if attack == PORTFOLIO else (result.settings.get("threat") or ["transfer"])
    threat = threat or ("transfer" if "transfer" in threats else threats[0])
    return attack, eps, steps, threat


def _delta_grids(recs: list[Record], settings: dict[str, Any], threat: str,
                 base_acc: float) -> dict[str, Any]:
    """transform → (radii × members) array of accuracy − the base model's (NaN where missing)."""
    import numpy as np

    members = list(settings.get("num_members", []))
    radii = list(settings.get("ensemble_eps", []))
    grids = {}
    for t in [t for t in settings.get("transforms", []) if t != ORIGINAL]:
        grid = np.full((len(radii), len(members)), np.nan)
        for r in recs:
            if r.transform == t and r.threat == threat:
                grid[radii.index(r.ensemble_eps), members.index(r.num_members)] = (
                    r.accuracy - base_acc)
        grids[t] = grid
    return grids


def _heatmap_panel(ax: Any, grid: Any, t: str, members: list, radii: list, first: bool,
                   vmax: float) -> Any:
    """One transform's Δ-accuracy panel, each cell labelled; returns the image."""
    import numpy as np

    image = ax.imshow(grid, cmap="coolwarm_r", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(members)), [str(m) for m in members], fontsize=7)
    ax.set_yticks(range(len(radii)), [f"{v:g}" for v in radii] if first else [], fontsize=7)
    ax.set_xlabel("num_members G", fontsize=8)
    if first:
        ax.set_ylabel("ensemble ε", fontsize=8)
    ax.set_title(f"{t} − original", fontsize=9)
    for yi in range(len(radii)):
        for xi in range(len(members)):
            if np.isfinite(grid[yi, xi]):
                ax.text(xi, yi, f"{grid[yi, xi]:+.2f}", ha="center", va="center",
                        fontsize=5.5, color="black")
    return image


def plot_delta_heatmap(result: EvaluationResult, *, attack: str | None = None,
                       eps: float | None = None, steps: int | None = None,
                       threat: str | None = None):
    """Accuracy minus the base model's over num_members × ensemble eps (Figure 10 style).

    One panel per ensemble transform; x = number of members G, y = ensemble radius ε.
    Red cells are worse than the base model (``coolwarm_r``, symmetric color scale).
    By default the clean strength (eps = 0) of the first attack is shown, else its first
    strength; ``threat`` defaults to ``transfer`` (the threats coincide on clean images), and
    to ``robust`` for portfolio results.

    Returns:
        A matplotlib ``Figure``.

    Raises:
        ValueError: no record matches the requested strength.
    """
    import numpy as np

    settings = result.settings
    attack, eps, steps, threat = _heatmap_strength(result, attack, eps, steps, threat)
    recs = [r for r in result.records if r.attack == attack and r.eps == eps and r.steps == steps]
    base = [r for r in recs if r.transform == ORIGINAL]
    if not base:
        raise ValueError(f"no base-model record for attack={attack} eps={eps} steps={steps}")
    base_acc = base[0].accuracy
    members = list(settings.get("num_members", []))
    radii = list(settings.get("ensemble_eps", []))
    grids = _delta_grids(recs, settings, threat, base_acc)
    finite = [np.nanmax(np.abs(g)) for g in grids.values() if np.isfinite(g).any()]
    vmax = max(finite + [1e-3])
    fig, axes = new_figure(1, max(len(grids), 1), squeeze=False,
                           figsize=(0.45 * len(members) * max(len(grids), 1) + 2.5,
                                    1.2 + 0.38 * len(radii)))
    fig.set_layout_engine("constrained")
    axes = axes[0]
    image = None
    for i, (ax, (t, grid)) in enumerate(zip(axes, grids.items(), strict=False)):
        image = _heatmap_panel(ax, grid, t, members, radii, i == 0, vmax)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.9, label="Δ accuracy")
    strength = f"{attack} eps={format_eps(eps)}" + (f" steps={steps}" if steps else "")
    fig.suptitle(f"Accuracy change vs. the single model ({threat}, "
                 f"{'clean' if eps == 0 or steps == 0 else strength}; original accuracy "
                 f"{base_acc:.3f})", fontsize=9)
    return fig
