"""Classifiers from other libraries, loaded by a short spec, taking [0, 1] images.

Every attack library (torchattacks, ART, AutoAttack, RobustBench) expects a model that takes
images in [0, 1]; a pretrained classifier usually wants normalized inputs. So a foreign model
is loaded together with its input normalization as its first layer::

    model = load_foreign_model("torchvision:resnet18", weights="r18.pt", num_classes=10,
                               normalize="cifar10")
    model(x)  # x in [0, 1]

Specs:

* ``timm:NAME`` — ``timm.create_model(NAME, pretrained=False, num_classes=...)``;
* ``torchvision:NAME`` — ``torchvision.models.get_model(NAME, weights=None, num_classes=...)``;
* ``package.module:factory`` — any importable callable returning an ``nn.Module`` (called with
  ``num_classes=`` when given), e.g. your own training code;
* ``robustbench:NAME`` — ``robustbench.utils.load_model`` from a local ``model_dir`` (the
  optional ``robustbench`` package; nothing is downloaded when the file is already there).

Weights (``weights=``) are a ``.safetensors`` file or a ``.pt``/``.pth`` state dict read with
``torch.load(weights_only=True)``, so loading cannot run code from the file; a ``state_dict`` or
``model`` entry and DDP's ``module.`` prefixes are unwrapped.
"""

from __future__ import annotations

import importlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .normalize import CIFAR10_MEAN, CIFAR10_STD, Normalize

__all__ = ["ModelSpecError", "load_foreign_model", "parse_normalization", "load_state_dict_file",
           "NORMALIZATIONS"]

#: Named input statistics for ``normalize=``.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_SPEC_HELP = ("expected 'timm:NAME', 'torchvision:NAME', 'package.module:factory' or "
              "'robustbench:NAME'")


class ModelSpecError(ValueError):
    """A model spec, weights file or normalization that cannot be used (the message says why)."""


def parse_normalization(value: str | tuple | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``None``/``"none"`` (the model normalizes itself), a name of :data:`NORMALIZATIONS`, a
    ``(mean, std)`` pair, or the text ``"m1,m2,m3/s1,s2,s3"``.

    Raises:
        ModelSpecError: anything else.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, tuple | list) and len(value) == 2:
        mean, std = value
    elif isinstance(value, str) and value.strip().lower() in NORMALIZATIONS:
        return NORMALIZATIONS[value.strip().lower()]
    elif isinstance(value, str) and value.count("/") == 1:
        mean, std = (part.split(",") for part in value.split("/"))
    else:
        raise ModelSpecError(f"normalization {value!r} not understood; expected 'none', one of "
                             f"{sorted(NORMALIZATIONS)} or 'm1,m2,m3/s1,s2,s3' (per RGB channel)")
    try:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise ModelSpecError(f"normalization {value!r}: means and stds must be numbers") from None
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise ModelSpecError(f"normalization {value!r}: expected 3 means and 3 positive stds")
    return mean, std


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a ``.pt``/``.pth``/``.bin`` state dict.

    ``.pt`` files are read with ``weights_only=True`` (no code runs); a dict holding the state
    dict under ``state_dict`` or ``model`` is unwrapped, and DDP's ``module.`` prefix dropped.

    Raises:
        ModelSpecError: missing file, unknown suffix, unreadable file, or no tensors inside.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelSpecError(f"weights file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ModelSpecError(f"weights file {str(path)!r}: unknown suffix {suffix!r}; expected "
                                 ".safetensors or a .pt/.pth state dict")
    except ModelSpecError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure means the file is unusable
        raise ModelSpecError(f"cannot read weights {str(path)!r} (a .pt file must hold a plain "
                             f"state dict: weights_only loading refuses pickled objects): {err}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSpecError(f"weights {str(path)!r} hold no state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    state = load_state_dict_file(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected),
                                      ("shape mismatch", shapes)) if items]
        raise ModelSpecError(f"weights {str(path)!r} do not fit the model: " + "; ".join(parts)
                             + " (check the spec and --num-classes)")
    model.load_state_dict(state)


def _build(spec: str, num_classes: int | None, model_dir: str | os.PathLike | None) -> nn.Module:
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise ModelSpecError(f"model spec {spec!r}: {_SPEC_HELP}")
    kwargs = {} if num_classes is None else {"num_classes": int(num_classes)}
    if source == "timm":
        import timm

        if name not in timm.list_models():
            raise ModelSpecError(f"timm has no model {name!r} (see timm.list_models())")
        return timm.create_model(name, pretrained=False, **kwargs)
    if source == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ModelSpecError(f"torchvision has no model {name!r} (see torchvision.models.list_models())")
        return torchvision.models.get_model(name, weights=None, **kwargs)
    if source == "robustbench":
        return _robustbench(name, model_dir)
    return _factory(spec, source, name, kwargs)


def _factory(spec: str, module_name: str, attr: str, kwargs: dict) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelSpecError(f"model spec {spec!r}: cannot import {module_name!r} ({err}); "
                             f"{_SPEC_HELP}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSpecError(f"model spec {spec!r}: {module_name} has no callable {attr!r}")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model spec {spec!r}: {attr}() returned a {type(model).__name__}, "
                             "expected a torch.nn.Module")
    return model


def _robustbench(name: str, model_dir: str | os.PathLike | None) -> nn.Module:
    try:
        from robustbench.utils import load_model
    except ImportError:
        raise ModelSpecError("'robustbench:' specs need the optional robustbench package "
                             "(pip install robustbench) and its weights in --model-dir") from None
    try:
        return load_model(model_name=name, model_dir=str(model_dir or "./models"),
                          dataset="cifar10", threat_model="Linf")
    except Exception as err:  # noqa: BLE001 - robustbench raises many kinds (download, keys)
        raise ModelSpecError(f"robustbench could not load {name!r} from {model_dir!r}: {err}") from None


def load_foreign_model(spec: str, *, weights: str | os.PathLike | None = None,
                       num_classes: int | None = None, normalize: str | tuple | None = None,
                       model_dir: str | os.PathLike | None = None) -> nn.Module:
    """A classifier from ``spec`` (see the module docstring), in eval mode, taking [0, 1] images.

    With ``normalize`` the result is ``nn.Sequential(normalize=Normalize(mean, std), model=net)``,
    so graph tools still see the network's own layers (as ``model.<name>``).

    Raises:
        ModelSpecError: a bad spec, weights that do not fit, or a bad normalization.
    """
    if not isinstance(spec, str):
        raise ModelSpecError(f"model spec must be a string, got {type(spec).__name__}; {_SPEC_HELP}")
    if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
        raise ModelSpecError(f"num_classes must be a positive integer, got {num_classes!r}")
    stats = parse_normalization(normalize)
    net = _build(spec.strip(), num_classes, model_dir)
    if weights is not None:
        _load_weights(net, weights)
    model = net if stats is None else nn.Sequential(OrderedDict(normalize=Normalize(*stats), model=net))
    model.model_spec = spec  # provenance for results files
    return model.eval()
