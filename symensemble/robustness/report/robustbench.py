"""RobustBench model-info files for an AutoAttack evaluation (``--protocol autoattack``).

RobustBench keeps one JSON file per model at ``model_info/<dataset>/<threat>/<Name>.json``
(https://github.com/RobustBench/robustbench, ``model_info/cifar10/Linf``). Its leaderboard code
(``robustbench/leaderboard/template.py`` and ``utils.list_available_models``) reads ``link``,
``name``, ``clean_acc``, ``venue``, ``architecture``, ``additional_data`` and the accuracy
field directly, so a file must carry every field of its schema (``utils.ModelInfo`` plus the
``footnote`` of the shipped files):

    link, name, authors, additional_data, number_forward_passes, dataset, venue,
    architecture, eps, clean_acc, reported, autoattack_acc, footnote

Accuracies are percentages as strings with two decimals, ``eps`` a fraction string such as
``8/255``, as in RobustBench's own files. What we cannot know is marked: ``authors`` is
``"unknown"``, ``link`` is ``""`` and ``venue`` is ``""`` (RobustBench's leaderboard shows an
empty venue as "Unpublished") unless ``--authors``, ``--link`` and ``--venue`` give them; the
footnote names the missing ones. The optional ``external`` (best known accuracy from other
evaluations) and ``unreliable`` flags are left out: RobustBench's template shows an absent
``unreliable`` as "Unknown" and falls back to ``autoattack_acc`` for ``external``.

Several radii: RobustBench's CIFAR-10 L∞ leaderboard is at 8/255, so the 8/255 file is
``<Name>.json``; any other radius gets its radius in the name (``<Name>_eps4-255.json``), so two
radii never overwrite each other.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ...vocab import format_eps
from ..records import EvaluationResult, Record
from .tables import target_label

__all__ = ["ModelCard", "MODEL_INFO_FIELDS", "UNKNOWN", "robustbench_info", "robustbench_files",
           "model_info_path"]

#: Every field of RobustBench's model-info schema, in the order of its files.
MODEL_INFO_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes",
                     "dataset", "venue", "architecture", "eps", "clean_acc", "reported",
                     "autoattack_acc", "footnote")
#: What a text field says when nobody told us its value.
UNKNOWN = "unknown"
#: RobustBench's standard CIFAR-10 L∞ radius: its file has no radius in the name.
STANDARD_EPS = 8 / 255


@dataclass(frozen=True)
class ModelCard:
    """What the user says about the model (``--model-name``, ``--link``, ``--authors``,
    ``--venue``); ``None`` = not given (marked unknown in the files)."""

    name: str | None = None
    link: str | None = None
    authors: str | None = None
    venue: str | None = None

    def missing(self) -> list[str]:
        """The options not given, as flags."""
        return [f"--{k}" for k in ("link", "authors", "venue") if getattr(self, k) is None]


def _forward_passes(record: Record, settings: dict[str, Any]) -> tuple[int, str]:
    """(number_forward_passes, the sentence that explains it).

    A symmetry ensemble runs the backbone once per image and then its G member heads (each a
    hidden layer of width h with its own transformed weights) on the shared features, so it
    costs one backbone pass plus G small heads: RobustBench counts full network passes, 1.
    """
    if record.num_members is None:
        return 1, "One forward pass of the model per image."
    stochastic = " (members redrawn on every forward; attacked with EOT)" if settings.get(
        "resample_members") else ""
    return 1, (f"Symmetry ensemble of G={record.num_members} members (ensemble eps "
               f"{record.ensemble_eps:g}): one backbone pass per image, then {record.num_members} "
               f"member heads on the shared features{stochastic}; number_forward_passes counts "
               "backbone passes.")


def robustbench_info(result: EvaluationResult, record: Record, clean: Record,
                     card: ModelCard | None = None) -> dict[str, Any]:
    """RobustBench ``model_info`` fields (:data:`MODEL_INFO_FIELDS`) for one target and radius.

    Args:
        result: the evaluation (its settings give the model, checkpoint, seed, n).
        record: the target's AutoAttack record at a radius > 0.
        clean: the same target's clean (eps = 0) record.
        card: what the user said about the model; missing values are marked unknown.
    """
    card = card or ModelCard()
    s = result.settings
    arch = str(s.get("model_name") or UNKNOWN)
    if record.num_members is not None:
        arch += (f" + {record.transform} symmetry ensemble (G={record.num_members}, "
                 f"ε={record.ensemble_eps:g})")
    passes, why = _forward_passes(record, s)
    missing = card.missing()
    note = (f" Not given: {', '.join(missing)} (marked unknown)." if missing else "")
    acc = f"{100 * record.accuracy:.2f}"
    return {
        "link": card.link if card.link is not None else "",
        "name": card.name or f"symensemble {target_label(record)}",
        "authors": card.authors if card.authors is not None else UNKNOWN,
        "additional_data": False,
        "number_forward_passes": passes,
        "dataset": "cifar10",
        "venue": card.venue if card.venue is not None else "",
        "architecture": arch,
        "eps": format_eps(record.eps),
        "clean_acc": f"{100 * clean.accuracy:.2f}",
        "reported": acc,
        "autoattack_acc": acc,
        "footnote": (f"{why} Measured by symensemble (AutoAttack standard) on n={record.n} "
                     f"CIFAR-10 test images, seed {s.get('seed')}, checkpoint "
                     f"{s.get('checkpoint')}.{note}"),
    }


def _file_stem(card: ModelCard, record: Record) -> str:
    """A RobustBench-style model id: letters, digits and underscores only."""
    base = card.name or "symensemble"
    if record.num_members is not None:
        base += f"_{record.transform}_G{record.num_members}_eps{record.ensemble_eps:g}"
    elif card.name is None:
        base += f"_{record.transform}"
    return re.sub(r"[^A-Za-z0-9_]+", "_", base).strip("_") or "model"


def model_info_path(card: ModelCard, record: Record) -> str:
    """``model_info/cifar10/Linf/<Name>.json``; radii other than 8/255 carry theirs in <Name>."""
    stem = _file_stem(card, record)
    if abs(record.eps - STANDARD_EPS) > 1e-12:
        stem += "_eps" + format_eps(record.eps).replace("/", "-").replace(".", "p")
    return f"model_info/cifar10/Linf/{stem}.json"


def robustbench_files(result: EvaluationResult, card: ModelCard | None = None) -> dict[str, str]:
    """{relative path: JSON text}, one model-info file per target and radius > 0 of an
    AutoAttack run ({} for other protocols, and for targets without a clean record)."""
    if result.settings.get("protocol") != "autoattack":
        return {}
    card = card or ModelCard()
    files = {}
    for r in result.records:
        if r.attack != "autoattack" or r.eps == 0 or r.threat == "transfer":
            continue
        clean = next((c for c in result.records if c.eps == 0 and c.transform == r.transform
                      and c.num_members == r.num_members and c.ensemble_eps == r.ensemble_eps
                      and c.threat == r.threat), None)
        if clean is not None:
            info = robustbench_info(result, r, clean, card)
            files[model_info_path(card, r)] = json.dumps(info, indent=2) + "\n"
    return files
