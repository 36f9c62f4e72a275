"""Reports of an :class:`~symensemble.robustness.records.EvaluationResult`.

* :mod:`.tables` — markdown, per-attack (cascade), CSV and JSON tables, sanity warnings.
* :mod:`.figures` — accuracy against eps (Figure 11) and the Δ-accuracy heatmap (Figure 10).
* :mod:`.paper` — our numbers beside the paper's (``symensemble reproduce``).
* :mod:`.robustbench` — RobustBench model-info files of an AutoAttack run.
* :mod:`.files` — the run's folder: :func:`write_results` and :func:`load_results`.
"""

from ...vocab import format_eps
from .figures import plot_accuracy, plot_delta_heatmap
from .files import load_results, result_texts, write_results
from .paper import compare_with_paper
from .robustbench import MODEL_INFO_FIELDS, ModelCard, robustbench_files, robustbench_info
from .tables import (
    PORTFOLIO,
    RECORD_FIELDS,
    markdown_table,
    portfolio_table,
    records_csv,
    results_json,
    warnings_text,
)

__all__ = [
    "markdown_table",
    "portfolio_table",
    "robustbench_info",
    "robustbench_files",
    "ModelCard",
    "MODEL_INFO_FIELDS",
    "warnings_text",
    "records_csv",
    "results_json",
    "result_texts",
    "plot_accuracy",
    "plot_delta_heatmap",
    "write_results",
    "load_results",
    "compare_with_paper",
    "format_eps",
    "RECORD_FIELDS",
    "PORTFOLIO",
]
