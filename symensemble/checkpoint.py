"""Safe checkpoints: safetensors weights plus JSON metadata, written atomically.

A checkpoint is one ``.safetensors`` file. Model weights are stored under their state-dict
names; optional training state (optimizer, RNG) under the ``train_state/`` prefix. The
metadata header holds JSON strings: the model name and constructor arguments (enough to
rebuild the model from the file alone), the recipe, epoch, metrics, data source, package
version and git revision. Loading never unpickles anything, so a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from . import __version__
from .io import atomic_write_bytes, atomic_write_text
from .models import SymModel, create_model, list_models
from .runtime import git_revision

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "read_checkpoint",
    "load_model",
    "resolve_checkpoint",
    "atomic_write_bytes",
    "atomic_write_text",
    "git_revision",
    "non_finite_tensors",
    "prepare_output",
]

FORMAT = "symensemble-checkpoint"
FORMAT_VERSION = "1"
TRAIN_STATE_PREFIX = "train_state/"
_PACKAGE_ROOT = Path(__file__).resolve().parent


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, foreign or does not match its model."""


def prepare_output(path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Check, before any work, that a run may write its checkpoint at ``path``.

    Refuses an existing checkpoint unless the run continues it (``resume``) or may replace it
    (``overwrite``), and proves the folder writable by creating and removing a probe file there
    (creating the folder if needed) — so a bad path fails now, not after the first epoch.

    Raises:
        CheckpointError: bad suffix, an existing file without resume/overwrite, a folder in
            the way, or a folder that cannot be created or written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint path must end in .safetensors, got {str(path)!r}")
    if resume and overwrite:
        raise CheckpointError("--resume continues the run at --out and --overwrite replaces it; pass one")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass a .safetensors file path")
    if path.exists() and not (resume or overwrite):
        raise CheckpointError(
            f"{path} already exists; pass --resume to continue that run, --overwrite to replace it, "
            "or another --out"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CheckpointError(f"cannot write a checkpoint in {path.parent}: {err.strerror or err}") from None
    return path


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (one reduction each)."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _name_list(keys: list[str]) -> str:
    return f"{keys[:5]}{' ...' if len(keys) > 5 else ''}"


def save_checkpoint(
    model: SymModel,
    path: str | os.PathLike,
    *,
    recipe: Mapping[str, Any] | None = None,
    epoch: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    data_source: str | None = None,
    train_state: Mapping[str, torch.Tensor] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model`` (and optional training state) atomically as safetensors.

    Args:
        model: a model built by :func:`symensemble.create_model` (it carries ``model_name``
            and ``model_args``).
        path: destination ``.safetensors`` file.
        recipe, epoch, metrics, data_source, extra: JSON-serializable metadata.
        train_state: flat tensors (optimizer moments, RNG states) for ``--resume``.

    Returns:
        The path written.

    Raises:
        CheckpointError: a model without ``model_name``, a path not ending in ``.safetensors``,
            or weights (or training state) holding NaN or infinity — such a model answers
            every input with garbage, so nothing is written and an existing file is kept.
    """
    if not getattr(model, "model_name", ""):
        raise CheckpointError(
            "model has no model_name; build it with symensemble.create_model(name, ...) so the "
            "checkpoint can rebuild it"
        )
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for key, value in (train_state or {}).items():
        tensors[TRAIN_STATE_PREFIX + key] = value.detach().cpu().contiguous()
    bad = non_finite_tensors(tensors)
    if bad:
        raise CheckpointError(
            f"refusing to write {path}: {len(bad)} tensor(s) hold NaN or infinity "
            f"({_name_list(bad)}); the model diverged or was moved off its valid range"
        )
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model.model_name,
        "model_args": json.dumps(getattr(model, "model_args", {})),
        "recipe": json.dumps(dict(recipe or {})),
        "epoch": json.dumps(epoch),
        "metrics": json.dumps(dict(metrics or {})),
        "data_source": json.dumps(data_source),
        "extra": json.dumps(dict(extra or {})),
        "symensemble_version": __version__,
        "torch_version": torch.__version__,
        "git_revision": git_revision(),
    }
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint path must end in .safetensors, got {str(path)!r}")
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def resolve_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """Find a checkpoint: an existing path, or a shipped name such as ``"paper_cnn"``.

    Names are looked up as ``<name>.safetensors`` in ``$SYMENSEMBLE_CHECKPOINTS``, the
    repository's ``checkpoints/`` folder and ``./checkpoints``.
    """
    candidate = Path(path_or_name).expanduser()
    if candidate.is_file():
        return candidate
    name = str(path_or_name)
    if candidate.suffix == "" and os.sep not in name:
        folders = [os.environ.get("SYMENSEMBLE_CHECKPOINTS"), _PACKAGE_ROOT.parent / "checkpoints",
                   Path.cwd() / "checkpoints"]
        for folder in folders:
            if folder and (Path(folder) / f"{name}.safetensors").is_file():
                return Path(folder) / f"{name}.safetensors"
    raise CheckpointError(
        f"no checkpoint at {name!r}: expected a .safetensors file written by symensemble, or the "
        "name of a shipped checkpoint (e.g. 'paper_cnn')"
    )


def _parse_meta(meta: Mapping[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: metadata field {key!r} is missing or not JSON ({err})") from None


def read_checkpoint(path_or_name: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and decoded metadata of a symensemble checkpoint, validating its header.

    Returns:
        (tensors, info) where info has model_name, model_args, recipe, epoch, metrics,
        data_source, extra, symensemble_version, torch_version, git_revision, path.

    Raises:
        CheckpointError: missing file, not safetensors, not a symensemble checkpoint.
    """
    path = resolve_checkpoint(path_or_name)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a symensemble checkpoint "
            f"(metadata format={meta.get('format')!r}, expected {FORMAT!r})"
        )
    info: dict[str, Any] = {"path": str(path), "model_name": meta.get("model_name", "")}
    for key in ("model_args", "recipe", "epoch", "metrics", "data_source", "extra"):
        info[key] = _parse_meta(meta, key, path)
    for key in ("symensemble_version", "torch_version", "git_revision"):
        info[key] = meta.get(key, "unknown")
    for key in ("model_args", "recipe", "metrics", "extra"):
        if not isinstance(info[key], dict):
            raise CheckpointError(f"{path}: metadata field {key!r} must be a JSON object, got {info[key]!r}")
    return tensors, info


def split_train_state(tensors: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split checkpoint tensors into (model state dict, training state)."""
    model_state = {k: v for k, v in tensors.items() if not k.startswith(TRAIN_STATE_PREFIX)}
    train_state = {
        k[len(TRAIN_STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(TRAIN_STATE_PREFIX)
    }
    return model_state, train_state


def load_model(
    path_or_name: str | os.PathLike = "paper_cnn",
    device: str | torch.device = "cpu",
    with_info: bool = False,
) -> SymModel | tuple[SymModel, dict[str, Any]]:
    """Rebuild a trained model from a checkpoint file alone, in eval mode.

    Args:
        path_or_name: a ``.safetensors`` path or a shipped checkpoint name (``"paper_cnn"``).
        device: where to put the model.
        with_info: also return the checkpoint metadata (recipe, metrics, ...).

    Raises:
        CheckpointError: the file is missing, corrupt, foreign, names an unknown model, its
            weights do not match the model it describes, or they hold NaN or infinity.
    """
    tensors, info = read_checkpoint(path_or_name)
    name = info["model_name"]
    if name not in list_models():
        raise CheckpointError(
            f"{info['path']} describes model {name!r}, which is not registered "
            f"(known: {list_models()})"
        )
    try:
        model = create_model(name, **info["model_args"])
    except ValueError as err:
        raise CheckpointError(f"{info['path']}: cannot rebuild model {name!r}: {err}") from None
    state, _ = split_train_state(tensors)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {_name_list(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise CheckpointError(f"{info['path']}: weights do not match model {name!r} ({detail})")
    bad = non_finite_tensors(state)
    if bad:  # refused, not warned: NaN logits argmax to class 0 and give silent wrong accuracies
        raise CheckpointError(
            f"{info['path']}: {len(bad)} weight tensor(s) hold NaN or infinity ({_name_list(bad)}); "
            "the run that wrote it diverged — retrain or use an earlier checkpoint"
        )
    model.load_state_dict(state)
    model.to(device).eval()
    return (model, info) if with_info else model
