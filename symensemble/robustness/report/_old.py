"""Tables (markdown, CSV, JSON) and figures for an :class:`~symensemble.robustness.records.EvaluationResult`.

* :func:`markdown_table` — rows = transform × threat (× ensemble size and radius in sweeps),
  columns = attack strength; one table per attack. The base model has one row, ``white-box``.
* :func:`records_csv`, :func:`results_json` — the same records, machine readable.
* :func:`plot_accuracy` — accuracy against eps (or steps), one panel per threat model
  (the paper's Figure 11, with the adaptive panel beside it and 95% Wilson bands).
* :func:`plot_delta_heatmap` — accuracy minus the base model's over num_members × ensemble eps
  (the paper's Figure 10; red = worse than the base model).
* :func:`compare_with_paper` — our numbers beside the paper's (for ``symensemble reproduce``).
* :func:`write_results` — all of them into a folder, each file written atomically.

Figures are drawn with matplotlib's Agg canvas directly (no pyplot state, no display needed).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes, atomic_write_text, to_jsonable
from ..plotting import figure_png, new_figure
from .records import ORIGINAL, WHITEBOX, WORST, EvaluationResult, Record, format_eps

PORTFOLIO = "portfolio"
from ..vocab import ROBUST  # noqa: E402

__all__ = [
    "markdown_table",
    "portfolio_table",
    "robustbench_info",
    "warnings_text",
    "records_csv",
    "results_json",
    "plot_accuracy",
    "plot_delta_heatmap",
    "write_results",
    "compare_with_paper",
    "format_eps",
    "RECORD_FIELDS",
]

RECORD_FIELDS = ("transform", "threat", "attack", "eps", "steps", "accuracy", "ci_low", "ci_high",
                 "n", "correct", "num_members", "ensemble_eps", "alpha", "broken")
_THREAT_ORDER = {WHITEBOX: 0, "transfer": 1, "adaptive": 2, WORST: 3}
_THREAT_LABEL = {WHITEBOX: "white-box", WORST: "worst-case"}


def _strength_order(records: Sequence[Record]) -> list[tuple[float, int | None]]:
    keys = {(r.eps, r.steps) for r in records}
    return sorted(keys, key=lambda k: (k[0], -1 if k[1] is None else k[1]))


def _column_label(eps: float, steps: int | None, vary_eps: bool, vary_steps: bool) -> str:
    parts = []
    if vary_eps or not vary_steps:
        parts.append(f"eps={format_eps(eps)}")
    if vary_steps and steps is not None:
        parts.append(f"steps={steps}")
    return " ".join(parts)


def _row_key(r: Record, order: dict[str, int]) -> tuple:
    return (0 if r.transform == ORIGINAL else 1, order.get(r.transform, 99), r.transform,
            r.num_members or 0, -(r.ensemble_eps or 0.0), _THREAT_ORDER.get(r.threat, 9), r.threat)


def markdown_table(result: EvaluationResult, *, digits: int = 3) -> str:
    """Accuracy tables in markdown, one per attack.

    Rows are transform × threat model (the base model once, as ``white-box``), plus the
    ensemble size G and radius ε when those are swept; columns are attack strengths.
    """
    transforms = list(result.settings.get("transforms", []))
    order = {t: i for i, t in enumerate(transforms)}
    sweep = (len(result.settings.get("num_members", [])) > 1
             or len(result.settings.get("ensemble_eps", [])) > 1)
    out: list[str] = []
    attacks = list(dict.fromkeys(r.attack for r in result.records))
    for attack in attacks:
        recs = [r for r in result.records if r.attack == attack
                and (attack != PORTFOLIO or r.threat == ROBUST)]
        cols = _strength_order(recs)
        vary_eps = len({c[0] for c in cols}) > 1
        vary_steps = len({c[1] for c in cols}) > 1
        labels = [_column_label(e, s, vary_eps, vary_steps) for e, s in cols]
        fixed = []
        if not vary_eps and cols:
            fixed.append(f"eps={format_eps(cols[0][0])}")
        if not vary_steps and cols and cols[0][1] is not None:
            fixed.append(f"steps={cols[0][1]}")
        out.append(f"**{attack}**" + (f" ({', '.join(fixed)})" if fixed else ""))
        out.append("")
        if sweep and len(cols) == 1:
            out += _sweep_rows(recs, result.settings, order, digits)
            out.append("")
            continue
        head = ["transform", "threat"] + (["G", "ens. eps"] if sweep else []) + labels
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join([":---"] * (4 if sweep else 2) + ["---:"] * len(labels)) + "|")
        rows: dict[tuple, dict[tuple, Record]] = {}
        for r in sorted(recs, key=lambda r: _row_key(r, order)):
            rows.setdefault((r.transform, r.threat, r.num_members, r.ensemble_eps), {})[
                (r.eps, r.steps)] = r
        for (transform, threat, g, e), cells in rows.items():
            name = transform
            shown = _THREAT_LABEL.get(threat, threat)
            lead = [name, shown]
            if sweep:
                lead += ["" if g is None else str(g), "" if e is None else f"{e:g}"]
            vals = [f"{cells[c].accuracy:.{digits}f}" if c in cells else "" for c in cols]
            out.append("| " + " | ".join(lead + vals) + " |")
        out.append("")
    n = result.records[0].n if result.records else 0
    agg = result.settings.get("aggregate", "")
    out.append(f"Accuracy on n={n} test images (ensembles counted by `{agg}`); 95% Wilson "
               "intervals in results.json / results.csv. " + (
                   "`robust`: images that survive every attack of the portfolio (eps=0: clean)."
                   if PORTFOLIO in attacks else
                   "`transfer`: examples crafted on the base model; `adaptive`: crafted on "
                   "each ensemble itself; `worst-case`: images that survive both."))
    return "\n".join(out).rstrip() + "\n"


def _sweep_rows(recs: list[Record], settings: dict[str, Any], order: dict[str, int],
                digits: int) -> list[str]:
    """A one-strength sweep: rows transform × threat × G, columns ensemble eps."""
    radii = list(settings.get("ensemble_eps", []))
    head = ["transform", "threat", "G"] + [f"ens. eps={e:g}" for e in radii]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join([":---"] * 3 + ["---:"] * len(radii)) + "|"]
    rows: dict[tuple, dict[float | None, Record]] = {}
    for r in sorted(recs, key=lambda r: _row_key(r, order)):
        rows.setdefault((r.transform, r.threat, r.num_members), {})[r.ensemble_eps] = r
    for (transform, threat, g), cells in rows.items():
        lead = [transform, _THREAT_LABEL.get(threat, threat), "" if g is None else str(g)]
        if None in cells:  # the base model: the same number in every column
            vals = [f"{cells[None].accuracy:.{digits}f}"] * len(radii)
        else:
            vals = [f"{cells[e].accuracy:.{digits}f}" if e in cells else "" for e in radii]
        lines.append("| " + " | ".join(lead + vals) + " |")
    return lines


def _target_label(r: Record) -> str:
    return r.transform if r.num_members is None else (
        f"{r.transform} (G={r.num_members}, ε={r.ensemble_eps:g})")


def portfolio_table(result: EvaluationResult, *, digits: int = 3) -> str:
    """The portfolio's cascade per target and radius, as AutoAttack logs it ("" if none).

    Columns are the attacks in the order they ran; each cell is the accuracy left after that
    attack and every earlier one, with the number of images it broke in parentheses; the
    last column is the robust accuracy with its 95% interval.
    """
    rows: dict[tuple, list[Record]] = {}
    for r in result.records:
        if r.attack == PORTFOLIO and r.eps > 0:
            rows.setdefault((_target_label(r), r.eps), []).append(r)
    if not rows:
        return ""
    stages = [r.threat for r in next(iter(rows.values())) if r.threat != ROBUST]
    lines = ["| target | eps | " + " | ".join(stages) + " | robust [95% CI] |",
             "|:---|---:|" + "---:|" * (len(stages) + 1)]
    for (label, eps), recs in rows.items():
        by = {r.threat: r for r in recs}
        cells = []
        for stage in stages:
            r = by.get(stage)
            if r is None:
                cells.append("")
            else:
                broke = "" if r.broken is None else f" ({r.broken})"
                cells.append(f"{r.accuracy:.{digits}f}{broke}" if r.threat == "clean" else
                             f"{_cumulative(recs, stage):.{digits}f}{broke}")
        rob = by[ROBUST]
        cells.append(f"{rob.accuracy:.{digits}f} [{rob.ci_low:.{digits}f}, {rob.ci_high:.{digits}f}]")
        lines.append(f"| {label} | {format_eps(eps)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cumulative(recs: list[Record], stage: str) -> float:
    """Accuracy after ``stage`` and every earlier one: clean minus what the stages broke."""
    left = next(r.correct for r in recs if r.threat == "clean")
    for r in recs:
        if r.threat == "clean":
            continue
        left -= r.broken or 0
        if r.threat == stage:
            return left / r.n
    raise KeyError(stage)


def robustbench_info(result: EvaluationResult, record: Record, clean: Record) -> dict[str, Any]:
    """RobustBench ``model_info`` fields for one target evaluated with ``--protocol autoattack``.

    Accuracies are percentages as strings with two decimals, as in RobustBench's files.
    ``number_forward_passes`` is 1: an ensemble runs its backbone once per image and only the
    (h × h) member heads G times.
    """
    s = result.settings
    arch = s.get("model_name", "model")
    if record.num_members is not None:
        arch += f" + {record.transform} symmetry ensemble (G={record.num_members}, ε={record.ensemble_eps:g})"
    return {"name": f"symensemble {_target_label(record)}", "architecture": arch,
            "dataset": "cifar10", "threat_model": "Linf", "eps": f"{format_eps(record.eps)}",
            "clean_acc": f"{100 * clean.accuracy:.2f}",
            "autoattack_acc": f"{100 * record.accuracy:.2f}", "n_examples": record.n,
            "number_forward_passes": 1, "additional_data": False, "reported": "",
            "footnote": f"measured by symensemble on this JPEG copy of CIFAR-10; "
                        f"checkpoint {s.get('checkpoint')}, seed {s.get('seed')}"}


def warnings_text(result: EvaluationResult) -> str:
    """The sanity-check findings as a short block of text."""
    if not result.warnings:
        probes = result.settings.get("sanity_probes") or []
        extra = f" (probes: {'; '.join(probes)})" if probes else ""
        return f"Sanity checks: all passed{extra}.\n"
    lines = [f"Sanity checks: {len(result.warnings)} warning(s)"]
    lines += [f"  - {w}" for w in result.warnings]
    return "\n".join(lines) + "\n"


def _csv_value(value: Any) -> Any:
    return "" if value is None else value


def records_csv(result: EvaluationResult) -> str:
    """The records as CSV text with a header row (``RECORD_FIELDS``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(RECORD_FIELDS)
    for r in result.records:
        d = r.to_dict()
        writer.writerow([_csv_value(d.get(k)) for k in RECORD_FIELDS])
    return buf.getvalue()


def results_json(result: EvaluationResult) -> str:
    """``{"settings", "records", "warnings", "probes"}`` as indented JSON text."""
    return json.dumps(to_jsonable(result.to_dict()), indent=2) + "\n"


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


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
    colors = ["tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown",
              "tab:pink", "tab:olive", "tab:cyan"]
    for i, attack in enumerate(attacks):
        recs = [r for r in result.records if r.attack == attack]
        use_steps = len({r.eps for r in recs}) == 1 and len({r.steps for r in recs}) > 1
        xkey = "steps" if use_steps else "eps"

        # a grid over eps and steps: one line per step count, never joining different ones
        split = sorted({r.steps for r in recs}, key=lambda v: (v is None, v or 0)) \
            if not use_steps and len({r.steps for r in recs}) > 1 else None

        for j, threat in enumerate(threats):
            ax = axes[i][j]
            for suffix, style, (xs, ys, lo, hi) in _accuracy_lines(
                    [r for r in recs if r.transform == ORIGINAL
                     and r.threat in (WHITEBOX, ROBUST)], xkey, split):
                ax.plot(xs, ys, "o" + style, color="black", lw=2.2,
                        label=f"original ({'robust' if portfolio else 'white-box'}){suffix}")
                ax.fill_between(xs, lo, hi, color="black", alpha=0.12, lw=0)
            for k, transform in enumerate(transforms):
                sel = [r for r in recs if r.transform == transform and r.threat == threat
                       and r.num_members == g and r.ensemble_eps == e]
                color = colors[k % len(colors)]
                for suffix, style, (xs, ys, lo, hi) in _accuracy_lines(sel, xkey, split):
                    ax.plot(xs, ys, "o" + style, color=color, lw=1.8, label=f"{transform}{suffix}")
                    ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
            ax.set_xlabel(f"{attack.upper()} {'iterations' if use_steps else 'epsilon'}")
            if j == 0:
                ax.set_ylabel("accuracy")
            shown = _THREAT_LABEL.get(threat, threat)
            ax.set_title(f"{shown} ({attack}; ensembles G={g}, ε={e:g})" if g is not None
                         else f"{shown} ({attack})", fontsize=10)
            ax.grid(alpha=0.3)
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=8)
    return fig


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
    attack = attack or result.records[0].attack
    recs = [r for r in result.records if r.attack == attack]
    if eps is None:
        strengths = _strength_order(recs)
        eps, default_steps = strengths[0]
        steps = default_steps if steps is None else steps
    elif steps is None:
        candidates = sorted({r.steps for r in recs if r.eps == eps}, key=lambda s: s or 0)
        steps = candidates[0] if candidates else None
    threats = [ROBUST] if attack == PORTFOLIO else (settings.get("threat") or ["transfer"])
    threat = threat or ("transfer" if "transfer" in threats else threats[0])
    recs = [r for r in recs if r.eps == eps and r.steps == steps]
    base = [r for r in recs if r.transform == ORIGINAL]
    if not base:
        raise ValueError(f"no base-model record for attack={attack} eps={eps} steps={steps}")
    base_acc = base[0].accuracy
    members = list(settings.get("num_members", []))
    radii = list(settings.get("ensemble_eps", []))
    transforms = [t for t in settings.get("transforms", []) if t != ORIGINAL]
    grids = {}
    for t in transforms:
        grid = np.full((len(radii), len(members)), np.nan)
        for r in recs:
            if r.transform == t and r.threat == threat:
                grid[radii.index(r.ensemble_eps), members.index(r.num_members)] = (
                    r.accuracy - base_acc)
        grids[t] = grid
    finite = [np.nanmax(np.abs(g)) for g in grids.values() if np.isfinite(g).any()]
    vmax = max(finite + [1e-3])
    fig, axes = new_figure(1, max(len(transforms), 1), squeeze=False,
                           figsize=(0.45 * len(members) * max(len(transforms), 1) + 2.5,
                                    1.2 + 0.38 * len(radii)))
    fig.set_layout_engine("constrained")
    axes = axes[0]
    image = None
    for i, (ax, t) in enumerate(zip(axes, transforms, strict=False)):
        grid = grids[t]
        image = ax.imshow(grid, cmap="coolwarm_r", vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(members)), [str(m) for m in members], fontsize=7)
        ax.set_yticks(range(len(radii)), [f"{v:g}" for v in radii] if i == 0 else [],
                      fontsize=7)
        ax.set_xlabel("num_members G", fontsize=8)
        if i == 0:
            ax.set_ylabel("ensemble ε", fontsize=8)
        ax.set_title(f"{t} − original", fontsize=9)
        for yi in range(len(radii)):
            for xi in range(len(members)):
                if np.isfinite(grid[yi, xi]):
                    ax.text(xi, yi, f"{grid[yi, xi]:+.2f}", ha="center", va="center",
                            fontsize=5.5, color="black")
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.9, label="Δ accuracy")
    strength = f"{attack} eps={format_eps(eps)}" + (f" steps={steps}" if steps else "")
    fig.suptitle(f"Accuracy change vs. the single model ({threat}, "
                 f"{'clean' if eps == 0 or steps == 0 else strength}; original accuracy "
                 f"{base_acc:.3f})", fontsize=9)
    return fig


def write_results(result: EvaluationResult, out_dir: str | os.PathLike, *,
                  figures: bool = True, extra: dict[str, str] | None = None) -> dict[str, Path]:
    """Write results.json, results.csv, table.md and the figures into ``out_dir``.

    Every file goes through a temporary file and ``os.replace``, so a reader never sees a
    half-written file. ``delta_heatmap.png`` is written only for sweeps over num_members or
    ensemble eps.

    Returns:
        {name: path} of the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    per_attack = portfolio_table(result)
    texts = {
        "results.json": results_json(result),
        "results.csv": records_csv(result),
        "table.md": markdown_table(result) + ("\n" + per_attack if per_attack else "") + "\n"
        + warnings_text(result),
        **_robustbench_files(result),
        **(extra or {}),
    }
    for name, text in texts.items():
        atomic_write_text(out / name, text)
        written[name] = out / name
    if figures and result.records:
        atomic_write_bytes(out / "accuracy_vs_eps.png", figure_png(plot_accuracy(result)))
        written["accuracy_vs_eps.png"] = out / "accuracy_vs_eps.png"
        s = result.settings
        if len(s.get("num_members", [])) > 1 or len(s.get("ensemble_eps", [])) > 1:
            if [t for t in s.get("transforms", []) if t != ORIGINAL]:
                atomic_write_bytes(out / "delta_heatmap.png",
                                   figure_png(plot_delta_heatmap(result)))
                written["delta_heatmap.png"] = out / "delta_heatmap.png"
    return written


def _robustbench_files(result: EvaluationResult) -> dict[str, str]:
    """``robustbench_<target>.json`` per target of an AutoAttack run (RobustBench model_info)."""
    if result.settings.get("protocol") != "autoattack":
        return {}
    files = {}
    for r in result.records:
        if r.attack != "autoattack" or r.eps == 0 or r.threat == "transfer":
            continue
        clean = next((c for c in result.records if c.eps == 0 and c.transform == r.transform
                      and c.num_members == r.num_members and c.ensemble_eps == r.ensemble_eps
                      and c.threat == r.threat), None)
        if clean is None:
            continue
        stem = r.transform if r.num_members is None else (
            f"{r.transform}_G{r.num_members}_eps{r.ensemble_eps:g}")
        info = robustbench_info(result, r, clean)
        files[f"robustbench_{stem}.json"] = json.dumps(info, indent=2) + "\n"
    return files


# --------------------------------------------------------------------------------------------
# Comparison with the paper's numbers
# --------------------------------------------------------------------------------------------


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)), abs(float(b)))


def _find(result: EvaluationResult, **want: Any) -> Record | None:
    for r in result.records:
        if all(_close(getattr(r, k), v) if isinstance(v, (int, float)) and not isinstance(v, bool)
               else getattr(r, k) == v for k, v in want.items()):
            return r
    return None


def compare_with_paper(result: EvaluationResult, paper: dict[str, Any]) -> str:
    """Our accuracies beside the paper's, as markdown.

    ``paper`` is a recipe's ``[paper]`` table, in one of two shapes:

    * a curve: ``eps = [...]`` (or ``steps = [...]``) and ``accuracy.<transform> = [...]``
      (Figure 11). Ours is the ``transfer`` number (the paper's protocol; ``white-box`` for
      the base model), with our ``adaptive`` and ``worst-case`` numbers below it.
    * a grid: ``num_members``, ``ensemble_eps`` and ``accuracy.<transform>`` as rows per
      ensemble eps × columns per num_members (Figure 10). Compared as Δ = ensemble − original,
      averaged over num_members for each ensemble eps.

    Returns:
        Markdown text ("" when ``paper`` has no ``accuracy`` table).
    """
    acc = paper.get("accuracy")
    if not isinstance(acc, dict) or not result.records:
        return ""
    source = paper.get("source", "the paper")
    if "num_members" in paper and "ensemble_eps" in paper:
        return _compare_grid(result, paper, acc, source)
    return _compare_curve(result, paper, acc, source)


def _compare_curve(result, paper, acc, source) -> str:
    xkey = "steps" if "steps" in paper else "eps"
    xs = list(paper.get(xkey, []))
    attack = result.records[0].attack
    s = result.settings
    g = (s.get("num_members") or [None])[0]
    e = (s.get("ensemble_eps") or [None])[0]
    label = [f"{xkey}={format_eps(x) if xkey == 'eps' else x}" for x in xs]
    lines = [f"Ours vs. paper ({source}); cells are ours / paper:", "",
             "| transform | threat | " + " | ".join(label) + " |",
             "|:---|:---|" + "---:|" * len(xs)]
    threats = [t for t in ("transfer", "adaptive") if t in s.get("threat", [])]
    if any(r.threat == WORST for r in result.records):
        threats.append(WORST)
    for transform, values in acc.items():
        rows = [WHITEBOX] if transform == ORIGINAL else threats
        for threat in rows:
            cells = []
            for x, p in zip(xs, values, strict=False):
                want = {"attack": attack, "transform": transform, "threat": threat, xkey: x}
                if transform != ORIGINAL:
                    want.update(num_members=g, ensemble_eps=e)
                r = _find(result, **want)
                ours = f"{r.accuracy:.3f}" if r is not None else "—"
                theirs = f"{p:.3f}" if threat in (WHITEBOX, "transfer") else "—"
                cells.append(f"{ours} / {theirs}")
            shown = _THREAT_LABEL.get(threat, threat)
            lines.append(f"| {transform} | {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _compare_grid(result, paper, acc, source) -> str:
    members = list(paper["num_members"])
    radii = list(paper["ensemble_eps"])
    original = acc.get(ORIGINAL)
    if original is None:
        return ""
    attack = result.records[0].attack
    cols = _strength_order([r for r in result.records if r.attack == attack])
    eps0, steps0 = cols[0]
    base = _find(result, attack=attack, transform=ORIGINAL, eps=eps0, steps=steps0)
    transforms = [t for t in acc if t != ORIGINAL]
    lines = [f"Mean Δ accuracy (ensemble − original) over num_members {members}, per ensemble "
             f"eps; ours / paper ({source}):", "",
             "| ensemble eps | " + " | ".join(transforms) + " |",
             "|---:|" + "---:|" * len(transforms)]
    for i, radius in enumerate(radii):
        cells = []
        for t in transforms:
            ours, theirs = [], []
            for j, g in enumerate(members):
                theirs.append(acc[t][i][j] - original[i][j])
                r = _find(result, attack=attack, transform=t, threat="transfer", eps=eps0,
                          steps=steps0, num_members=g, ensemble_eps=radius)
                if r is not None and base is not None:
                    ours.append(r.accuracy - base.accuracy)
            o = f"{sum(ours) / len(ours):+.3f}" if ours else "—"
            cells.append(f"{o} / {sum(theirs) / len(theirs):+.3f}")
        lines.append(f"| {radius:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
