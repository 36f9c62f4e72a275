"""Models created by name, timm style: ``@register_model`` and :func:`create_model`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .head import SymModel

__all__ = ["register_model", "create_model", "list_models"]

_MODELS: dict[str, Callable[..., SymModel]] = {}


def register_model(name: str) -> Callable[[Callable[..., SymModel]], Callable[..., SymModel]]:
    """Register a constructor ``fn(**kwargs) -> SymModel`` under ``name``."""

    def wrap(fn: Callable[..., SymModel]) -> Callable[..., SymModel]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> SymModel:
    """Build a registered model; records ``model_name`` and ``model_args`` for checkpoints.

    Raises:
        ValueError: unknown name or arguments the constructor does not accept.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {list_models()}")
    try:
        model = _MODELS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments {kwargs} for model {name!r}: {err}") from None
    model.model_name = name
    model.model_args = dict(kwargs)
    return model
