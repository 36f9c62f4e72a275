"""symensemble: CIFAR-10 robustness with parameter-space symmetry ensembles.

Implements Zhao, Ganev, Walters, Yu & Dehmamy, "Symmetries, Flat Minima, and the Conserved
Quantities of Gradient Flow" (ICLR 2023). Public API::

    import symensemble as se
    model = se.load_model("checkpoints/paper_cnn.safetensors")
    ens = se.SymmetryEnsemble(model, calibration_images, num_members=200, eps=10.0)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names resolved lazily so `import symensemble` stays fast (torch/timm load on demand).
_EXPORTS = {
    "create_model": "symensemble.models",
    "list_models": "symensemble.models",
    "SymHead": "symensemble.models",
    "SymModel": "symensemble.models",
    "create_activation": "symensemble.symmetry.activations",
    "list_activations": "symensemble.symmetry.activations",
    "load_model": "symensemble.checkpoint",
    "save_checkpoint": "symensemble.checkpoint",
    "CheckpointError": "symensemble.checkpoint",
    "load_cifar10": "symensemble.data",
    "DataError": "symensemble.data",
    "SplitSizeError": "symensemble.data",
    "Recipe": "symensemble.training.recipe",
    "RecipeError": "symensemble.training.recipe",
    "train": "symensemble.training.loop",
    "DivergenceError": "symensemble.training.loop",
    "SymmetryEnsemble": "symensemble.ensembles.ensemble",
    "locate_head": "symensemble.ensembles.locate",
    "HeadParts": "symensemble.symmetry.heads",
    "TRANSFORMS": "symensemble.ensembles.ensemble",
    "evaluate": "symensemble.robustness.evaluation",
    "EvalConfig": "symensemble.robustness.config",
    "list_attacks": "symensemble.robustness.attacks",
    "build_ensemble": "symensemble.robustness.targets",
    "stratified_subset": "symensemble.robustness.targets",
    "EvaluationResult": "symensemble.robustness.records",
    "load_results": "symensemble.robustness.report",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'symensemble' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
