"""Safe checkpoints: safetensors weights plus JSON metadata, written atomically.

A checkpoint is one ``.safetensors`` file. Model weights are stored under their state-dict
names; optional training state (optimizer, RNG) under the ``train_state/`` prefix. The
metadata header holds JSON strings: the model name and constructor arguments (enough to
rebuild the model from the file alone), the recipe, epoch, metrics, data source, package
version and git revision. Loading never unpickles anything, so a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import math
import os
import re
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
from .runtime import PACKAGE_ROOT, git_revision
from .symmetry.activations import list_activations

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
    "check_model_args",
    "SAFE_MODEL_ARGS",
]

FORMAT = "symensemble-checkpoint"
FORMAT_VERSION = "1"
TRAIN_STATE_PREFIX = "train_state/"


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
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint path must end in .safetensors, got {str(path)!r}")
    fields = {"model_args": getattr(model, "model_args", {}), "recipe": dict(recipe or {}), "epoch": epoch,
              "metrics": dict(metrics or {}), "data_source": data_source, "extra": dict(extra or {})}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_name": model.model_name,
                **{key: json.dumps(value) for key, value in fields.items()},
                "symensemble_version": __version__, "torch_version": torch.__version__,
                "git_revision": git_revision()}
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
        folders = [os.environ.get("SYMENSEMBLE_CHECKPOINTS"), PACKAGE_ROOT.parent / "checkpoints",
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


#: Constructor arguments a checkpoint may hand to its model, by kind. Anything else in the
#: metadata's ``model_args`` is refused before a model is built: a checkpoint must never name a
#: file for a constructor to read (e.g. ``timm_kwargs.checkpoint_path``) or free text to act on.
#: A new model argument that checkpoints must carry is added here.
SAFE_MODEL_ARGS: dict[str, str] = {
    "hidden": "int", "num_classes": "int", "channels": "int", "image_size": "int", "whiten_size": "int",
    "conv_slope": "number", "drop_rate": "number", "whiten_eps": "number", "bn_momentum": "number",
    "dirac": "bool", "tta_flip": "bool", "input_mean": "numbers", "input_std": "numbers", "widths": "ints",
    "act": "activation", "act_kwargs": "table:act", "timm_kwargs": "table:timm",
}
_SAFE_TABLES: dict[str, dict[str, str]] = {
    "act": {"negative_slope": "number", "linear_coef": "number", "shift": "number", "profile": "word"},
    "timm": {"img_size": "ints_or_int", "patch_size": "int", "drop_path_rate": "number", "in_chans": "int",
             "embed_dim": "int", "depth": "int", "num_heads": "int", "mlp_ratio": "number",
             "qkv_bias": "bool", "class_token": "bool"},
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


_KIND_CHECKS: dict[str, Any] = {
    "int": _is_int,
    "number": _is_number,
    "bool": lambda v: isinstance(v, bool),
    "numbers": lambda v: isinstance(v, list) and len(v) <= 16 and all(_is_number(x) for x in v),
    "ints": lambda v: isinstance(v, list) and len(v) <= 16 and all(_is_int(x) for x in v),
    "ints_or_int": lambda v: _is_int(v) or (isinstance(v, list) and len(v) <= 3
                                            and all(_is_int(x) for x in v)),
    "word": lambda v: isinstance(v, str) and re.fullmatch(r"[a-z][a-z0-9_]{0,31}", v) is not None,
    "activation": lambda v: isinstance(v, str) and v in list_activations(),
}


def check_model_args(args: Mapping[str, Any], where: str) -> None:
    """Refuse constructor arguments outside :data:`SAFE_MODEL_ARGS` (names, and kinds of values).

    Raises:
        CheckpointError: an argument not on the allow-list (e.g. a file path), or a value of the
            wrong kind; the message names it.
    """
    def refuse(name: str, value: Any, expected: str) -> CheckpointError:
        return CheckpointError(
            f"{where}: model argument {name} = {value!r} is not allowed in a checkpoint ({expected}); "
            "checkpoints may only carry the model settings of a recipe, never paths — "
            "the file was not written by symensemble or was altered"
        )

    for name, value in args.items():
        kind = SAFE_MODEL_ARGS.get(name)
        if kind is None:
            raise refuse(name, value, f"allowed: {sorted(SAFE_MODEL_ARGS)}")
        if kind.startswith("table:"):
            table = _SAFE_TABLES[kind.removeprefix("table:")]
            if value is None:
                continue
            if not isinstance(value, dict):
                raise refuse(name, value, "expected a table")
            for key, item in value.items():
                if key not in table:
                    raise refuse(f"{name}.{key}", item, f"allowed in {name}: {sorted(table)}")
                if not _KIND_CHECKS[table[key]](item):
                    raise refuse(f"{name}.{key}", item, f"expected {table[key]}")
        elif not _KIND_CHECKS[kind](value):
            raise refuse(name, value, f"expected {kind}")


def _check_weights(path: str, name: str, state: Mapping[str, torch.Tensor], args: Mapping[str, Any]) -> None:
    """Compare the stored tensors with the model the metadata describes, built on the meta
    device (no memory: a metadata ``hidden = 10**9`` never reaches the allocator): the same
    names, shapes, and floating-point weights where the model has floating-point weights."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            expected = create_model(name, **args).state_dict()
    except (ValueError, TypeError, RuntimeError, OverflowError, NotImplementedError) as err:
        raise CheckpointError(f"{path}: cannot rebuild model {name!r}: {err}") from None
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    common = set(state) & set(expected)
    wrong = sorted(k for k in common if state[k].shape != expected[k].shape)
    dtype = sorted(k for k in common if expected[k].is_floating_point() != state[k].is_floating_point())
    if missing or unexpected or wrong or dtype:
        detail = "; ".join(
            f"{label}: {_name_list(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                                ("wrong dtype (floating-point weights expected)", dtype))
            if keys
        )
        raise CheckpointError(f"{path}: weights do not match model {name!r} ({detail})")


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
    check_model_args(info["model_args"], info["path"])
    state, _ = split_train_state(tensors)
    _check_weights(info["path"], name, state, info["model_args"])
    bad = non_finite_tensors(state)
    if bad:  # refused, not warned: NaN logits argmax to class 0 and give silent wrong accuracies
        raise CheckpointError(
            f"{info['path']}: {len(bad)} weight tensor(s) hold NaN or infinity ({_name_list(bad)}); "
            "the run that wrote it diverged — retrain or use an earlier checkpoint"
        )
    try:
        model = create_model(name, **info["model_args"])
    except ValueError as err:
        raise CheckpointError(f"{info['path']}: cannot rebuild model {name!r}: {err}") from None
    model.load_state_dict(state)
    model.to(device).eval()
    return (model, info) if with_info else model
