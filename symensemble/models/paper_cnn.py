"""The paper's CIFAR-10 network (App. I): Conv 3×3 → LeakyReLU → MaxPool 2 → Linear → σ → Linear."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .head import SymHead, SymModel
from .normalize import CIFAR10_MEAN, CIFAR10_STD, Normalize
from .registry import register_model


class PaperCNN(SymModel):
    """Conv2d(3→channels, 3×3, same) → LeakyReLU(conv_slope) → MaxPool 2 → flatten → SymHead.

    Args:
        hidden: h, the hidden width of the head (paper: 16 in the notebook, 32 in App. I).
        act: hidden activation σ by name (paper: leaky_relu with slope 0.1).
        act_kwargs: its arguments.
        channels: convolution channels (32).
        conv_slope: LeakyReLU slope after the convolution.
        num_classes: C.
        image_size: input side (32 for CIFAR-10).
        input_mean, input_std: per-channel normalization of the [0, 1] input (default: the
            CIFAR-10 statistics). The authors' notebook feeds x − 0.5: mean 0.5, std 1.
    """

    def __init__(
        self,
        hidden: int = 16,
        act: str = "leaky_relu",
        act_kwargs: dict[str, Any] | None = None,
        channels: int = 32,
        conv_slope: float = 0.1,
        num_classes: int = 10,
        image_size: int = 32,
        input_mean: Sequence[float] = CIFAR10_MEAN,
        input_std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.normalize = Normalize(tuple(input_mean), tuple(input_std))
        self.conv = nn.Conv2d(3, channels, kernel_size=3, padding=1)
        self.conv_act = nn.LeakyReLU(conv_slope)
        self.pool = nn.MaxPool2d(2)
        embed_dim = channels * (image_size // 2) ** 2
        self.head = SymHead(embed_dim, hidden, num_classes, act, act_kwargs)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv_act(self.conv(self.normalize(x)))).flatten(1)


@register_model("paper_cnn")
def paper_cnn(**kwargs: Any) -> PaperCNN:
    return PaperCNN(**kwargs)
