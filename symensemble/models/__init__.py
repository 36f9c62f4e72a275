"""Model registry: the paper's CNN, fast_net (airbench-like) and timm backbones, each ending in a SymHead."""

from . import fast_net as _fast_net  # noqa: F401  (registers fast_net)
from . import paper_cnn as _paper_cnn  # noqa: F401  (registers paper_cnn)
from . import timm_models as _timm_models  # noqa: F401  (registers timm backbones)
from .head import SymHead, SymModel
from .normalize import Normalize
from .registry import create_model, list_models, register_model

__all__ = ["SymHead", "SymModel", "Normalize", "create_model", "list_models", "register_model"]
