"""Tables of an :class:`~symensemble.robustness.records.EvaluationResult`: markdown, CSV and JSON.

* :func:`markdown_table` — rows = transform × threat (× ensemble size and radius in sweeps),
  columns = attack strength; one table per attack. The base model has one row, ``white-box``.
* :func:`portfolio_table` — the portfolio's cascade per target and radius, as AutoAttack logs it.
* :func:`records_csv`, :func:`results_json` — the same records, machine readable.
* :func:`warnings_text` — the sanity-check findings.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from ...io import to_jsonable
from ...vocab import ORIGINAL, ROBUST, WHITEBOX, WORST, format_eps
from ..records import EvaluationResult, Record

__all__ = [
    "RECORD_FIELDS",
    "PORTFOLIO",
    "markdown_table",
    "portfolio_table",
    "warnings_text",
    "records_csv",
    "results_json",
    "target_label",
    "threat_label",
    "strength_order",
]

#: Attack name of the portfolio's records.
PORTFOLIO = "portfolio"
RECORD_FIELDS = ("transform", "threat", "attack", "eps", "steps", "accuracy", "ci_low", "ci_high",
                 "n", "correct", "num_members", "ensemble_eps", "alpha", "broken")
_THREAT_ORDER = {WHITEBOX: 0, "transfer": 1, "adaptive": 2, WORST: 3}
_THREAT_LABEL = {WHITEBOX: "white-box", WORST: "worst-case"}


def threat_label(threat: str) -> str:
    """A threat model's name as the tables print it (``white-box``, ``worst-case``, ...)."""
    return _THREAT_LABEL.get(threat, threat)


def strength_order(records: Sequence[Record]) -> list[tuple[float, int | None]]:
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
        cols = strength_order(recs)
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
            shown = threat_label(threat)
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
        lead = [transform, threat_label(threat), "" if g is None else str(g)]
        if None in cells:  # the base model: the same number in every column
            vals = [f"{cells[None].accuracy:.{digits}f}"] * len(radii)
        else:
            vals = [f"{cells[e].accuracy:.{digits}f}" if e in cells else "" for e in radii]
        lines.append("| " + " | ".join(lead + vals) + " |")
    return lines


def target_label(r: Record) -> str:
    """The target of a record as a row label: ``group (G=200, ε=10)``, or the transform."""
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
            rows.setdefault((target_label(r), r.eps), []).append(r)
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


