"""An evaluation's output folder: :func:`write_results` writes it, :func:`load_results` reads it.

The folder follows the one output policy of :mod:`symensemble.io`: a non-empty folder is
refused unless ``overwrite``; the files are written into a temp folder beside it that takes
the folder's name only once everything is written, so the folder never holds a partial run or
files of two runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ...io import atomic_write_bytes, atomic_write_text, check_out_dir, staged_dir
from ...plotting import figure_png
from ...vocab import ORIGINAL
from ..config import EvalConfig
from ..records import EvaluationResult, Record
from .figures import plot_accuracy, plot_delta_heatmap
from .robustbench import ModelCard, robustbench_files
from .tables import markdown_table, portfolio_table, records_csv, results_json, warnings_text

__all__ = ["write_results", "load_results", "result_texts"]


def result_texts(result: EvaluationResult, card: ModelCard | None = None) -> dict[str, str]:
    """{relative path: text} of every text file of a run: results.json, results.csv, table.md
    and (protocol ``autoattack``) RobustBench's ``model_info/cifar10/Linf/<Name>.json``."""
    per_attack = portfolio_table(result)
    return {
        "results.json": results_json(result),
        "results.csv": records_csv(result),
        "table.md": markdown_table(result) + ("\n" + per_attack if per_attack else "") + "\n"
        + warnings_text(result),
        **robustbench_files(result, card),
    }


def _figures(result: EvaluationResult) -> dict[str, bytes]:
    """accuracy_vs_eps.png, and delta_heatmap.png for sweeps over num_members or ensemble eps."""
    if not result.records:
        return {}
    out = {"accuracy_vs_eps.png": figure_png(plot_accuracy(result))}
    s = result.settings
    sweep = len(s.get("num_members", [])) > 1 or len(s.get("ensemble_eps", [])) > 1
    if sweep and [t for t in s.get("transforms", []) if t != ORIGINAL]:
        out["delta_heatmap.png"] = figure_png(plot_delta_heatmap(result))
    return out


def write_results(result: EvaluationResult, out_dir: str | os.PathLike, *,
                  figures: bool = True, extra: dict[str, str] | None = None,
                  overwrite: bool = False, card: ModelCard | None = None) -> dict[str, Path]:
    """Write results.json, results.csv, table.md, the figures (and model-info files) to ``out_dir``.

    Args:
        result: the evaluation.
        out_dir: the run's folder; refused when it holds files, unless ``overwrite`` (then it
            is replaced whole: no file of the earlier run stays).
        figures: also draw the PNG figures.
        extra: more text files, {name: text} (``comparison.md`` of ``reproduce``).
        overwrite: replace a non-empty ``out_dir``.
        card: what to write into RobustBench's name/link/authors/venue fields.

    Returns:
        {name: path} of the files written (paths in ``out_dir``).

    Raises:
        symensemble.io.OutputError: ``out_dir`` holds files (no ``overwrite``) or is not writable.
    """
    out = check_out_dir(out_dir, overwrite=overwrite)
    texts = {**result_texts(result, card), **(extra or {})}
    images = _figures(result) if figures else {}
    with staged_dir(out) as tmp:
        for name, text in texts.items():
            atomic_write_text(tmp / name, text)
        for name, data in images.items():
            atomic_write_bytes(tmp / name, data)
    return {name: out / name for name in [*texts, *images]}


def load_results(path: str | os.PathLike) -> EvaluationResult:
    """Read a ``results.json`` written by :func:`write_results`; its ``config`` rebuilt from
    the settings (``None`` when another version wrote them)."""
    payload = json.loads(Path(path).read_text())
    fields = Record.__dataclass_fields__
    make = lambda d: Record(**{k: v for k, v in d.items() if k in fields})  # noqa: E731
    settings = payload.get("settings", {})
    try:
        config = EvalConfig.from_mapping(settings, "results", lenient=True) if settings else None
    except ValueError:
        config = None  # written by another version: the settings still read
    return EvaluationResult(settings=settings, records=[make(r) for r in payload.get("records", [])],
                            warnings=list(payload.get("warnings", [])),
                            probes=[make(r) for r in payload.get("probes", [])], config=config)
