"""Per-channel input normalization as the model's first layer, so models take [0, 1] images."""

from __future__ import annotations

import torch
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """(x − mean) / std per channel; buffers move with the model and are saved with it."""

    def __init__(self, mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD):
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or any(not float(v) > 0 for v in std):
            raise ValueError(f"input normalization needs 3 means and 3 positive stds (one per RGB "
                             f"channel), got mean={list(mean)} std={list(std)}")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The shape check is skipped while torch.fx traces (a Proxy has no concrete shape), so
        # locate_head can trace a foreign model with this layer in front (load_foreign_model).
        if not isinstance(x, torch.fx.Proxy) and (x.ndim != 4 or x.shape[1] != self.mean.shape[1]):
            raise ValueError(
                f"expected images of shape (B, {self.mean.shape[1]}, H, W), got {tuple(x.shape)}"
            )
        return (x - self.mean) / self.std
