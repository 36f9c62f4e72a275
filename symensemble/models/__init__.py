"""Model registry: the paper's CNN and timm backbones, all ending in a :class:`SymHead`."""

from . import paper_cnn as _paper_cnn  # noqa: F401  (registers paper_cnn)
from . import timm_models as _timm_models  # noqa: F401  (registers timm backbones)
from .head import SymHead, SymModel
from .normalize import Normalize
from .registry import create_model, list_models, register_model

__all__ = ["SymHead", "SymModel", "Normalize", "create_model", "list_models", "register_model"]
