"""timm backbones adapted to 32×32 CIFAR-10 inputs, each ending in a SymHead.

The backbone comes from ``timm.create_model(arch, num_classes=0, pretrained=False)`` (pooled
features, no classifier). For ResNets the ImageNet stem (7×7 stride-2 conv + max-pool) would
shrink a 32×32 image to 8×8 before the first stage, so it is replaced by a 3×3 stride-1 conv
and no max-pool — the standard CIFAR ResNet stem.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .head import SymHead, SymModel
from .normalize import Normalize
from .registry import register_model


def _cifar_stem(backbone: nn.Module) -> None:
    """Swap a timm ResNet's ImageNet stem for a 3×3 stride-1 conv without max-pool (in place)."""
    conv1 = getattr(backbone, "conv1", None)
    if isinstance(conv1, nn.Conv2d):
        backbone.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, 1, 1, bias=False)
        if hasattr(backbone, "maxpool"):
            backbone.maxpool = nn.Identity()


class TimmSymModel(SymModel):
    """A timm feature extractor (``num_classes=0``) followed by a SymHead.

    Args:
        arch: timm architecture name (e.g. ``resnet18``).
        hidden: h (default 128).
        act, act_kwargs: hidden activation of the head.
        num_classes: C.
        drop_rate: dropout before the head (timm ``drop_rate``).
        timm_kwargs: extra ``timm.create_model`` arguments (e.g. ``img_size`` for a ViT).
    """

    def __init__(
        self,
        arch: str,
        hidden: int = 128,
        act: str = "leaky_relu",
        act_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        drop_rate: float = 0.0,
        timm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import timm

        self.normalize = Normalize()
        try:
            self.backbone = timm.create_model(
                arch, pretrained=False, num_classes=0, drop_rate=drop_rate, **(timm_kwargs or {})
            )
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"timm cannot build architecture {arch!r}: {err}") from None
        _cifar_stem(self.backbone)
        self.image_size = (timm_kwargs or {}).get("img_size", 32)  # CIFAR-10 unless told otherwise
        self.head = SymHead(self.backbone.num_features, hidden, num_classes, act, act_kwargs)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


def _register_timm(name: str, arch: str, **defaults: Any) -> None:
    @register_model(name)
    def build(**kwargs: Any) -> TimmSymModel:
        return TimmSymModel(arch, **{**defaults, **kwargs})


for _name in ("resnet18", "resnet34", "resnet50"):
    _register_timm(_name, _name)
# A ViT with 4×4 patches on 32×32 images (64 tokens), as is usual for CIFAR-10.
_register_timm(
    "vit_tiny", "vit_tiny_patch16_224", timm_kwargs={"img_size": 32, "patch_size": 4}
)
