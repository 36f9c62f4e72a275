"""Our numbers beside the paper's: :func:`compare_with_paper` (for ``symensemble reproduce``)."""

from __future__ import annotations

from typing import Any

from ...vocab import ORIGINAL, WHITEBOX, WORST, format_eps
from ..records import EvaluationResult, Record
from .tables import strength_order, threat_label

__all__ = ["compare_with_paper"]


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
            shown = threat_label(threat)
            lines.append(f"| {transform} | {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _compare_grid(result, paper, acc, source) -> str:
    members = list(paper["num_members"])
    radii = list(paper["ensemble_eps"])
    original = acc.get(ORIGINAL)
    if original is None:
        return ""
    attack = result.records[0].attack
    cols = strength_order([r for r in result.records if r.attack == attack])
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
