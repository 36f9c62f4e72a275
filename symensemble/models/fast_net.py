"""A fast CIFAR-10 network in the class of airbench94 (Jordan 2024), ending in a SymHead.

The ideas taken from airbench (read for ideas; nothing copied):

* the first layer is a fixed 2×2 convolution that *whitens* image patches, initialized from
  the training data (:func:`patch_whitening`), with its negated filters beside it so that the
  GELU after it loses no sign information; no BatchNorm follows it;
* three VGG-like stages ``conv 3×3 → max-pool 2 → BN → GELU → conv 3×3 → BN → GELU``
  (pooling right after the first conv keeps BN and GELU at the lower resolution), widths
  64/256/256 by default, convolutions without bias and with identity (Dirac) initialization of
  their first filters, BatchNorm with a fast running-statistics momentum;
* test-time flip augmentation, here on the *features*: in eval mode the embedding is the mean
  of the embeddings of the image and its mirror image, so the model still ends in the
  ``Linear → σ → Linear`` :class:`SymHead` the symmetry ensembles act on, and attacks see the
  same function that is evaluated.

Training-side choices (label smoothing, lookahead, bf16, channels-last, torch.compile, data
on the GPU) live in the recipe, ``recipes/fast_gpu.toml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .head import SymHead, SymModel
from .normalize import Normalize
from .registry import register_model

__all__ = ["FastNet", "patch_whitening"]


def _patches(images: torch.Tensor, size: int) -> torch.Tensor:
    """All ``size``×``size`` patches (stride 1, no padding) as rows, (N·P, C·size²), float64."""
    cols = torch.nn.functional.unfold(images.double(), kernel_size=size)  # (N, C·size², P)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def patch_whitening(images: torch.Tensor, size: int = 2, eps: float = 5e-4, chunk: int = 512
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv filters and bias that whiten the ``size``×``size`` patches of ``images`` (PCA whitening).

    With Σ = Q Λ Qᵀ the covariance of the flattened patches p (d = C·size² values) and μ their
    mean, the filters are the rows of W = (Λ + eps)^{-1/2} Qᵀ and the bias is −W μ, so the
    convolution outputs z = W (p − μ) have mean 0 and covariance (Λ + eps)^{-1} Λ — the identity
    up to ``eps``, which bounds the gain of near-constant directions. The statistics are
    accumulated over chunks of ``chunk`` images in float64.

    Args:
        images: (N, C, H, W) floating-point images, as they enter the convolution.
        size: patch side (the kernel size of the convolution).
        eps: added to every eigenvalue; 0 gives exact whitening (needs Σ non-singular).
        chunk: images per chunk (memory only; the result does not depend on it).

    Returns:
        ``weight`` (d, C, size, size) and ``bias`` (d,), float64, rows in descending eigenvalue order.

    Shape:
        images (N, C, H, W) → weight (C·size², C, size, size), bias (C·size²,).
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"expected floating-point images (N, C, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    if images.shape[-1] < size or images.shape[-2] < size or images.shape[0] == 0:
        raise ValueError(f"need at least one image of at least {size}×{size} pixels, "
                         f"got {tuple(images.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    d = images.shape[1] * size * size
    total = torch.zeros(d, dtype=torch.float64, device=images.device)
    outer = torch.zeros(d, d, dtype=torch.float64, device=images.device)
    count = 0
    for start in range(0, images.shape[0], chunk):
        p = _patches(images[start : start + chunk], size)
        total += p.sum(0)
        outer += p.T @ p
        count += p.shape[0]
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    eigvals, eigvecs = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)
    weight = eigvecs.T / (eigvals + eps).sqrt()[:, None]
    if not torch.isfinite(weight).all():
        raise ValueError("patch covariance is singular; use eps > 0 or more varied images")
    return weight.reshape(d, images.shape[1], size, size), -(weight @ mean)


class _Stage(nn.Module):
    """conv 3×3 → max-pool 2 → BN → GELU → conv 3×3 → BN → GELU (convs without bias)."""

    def __init__(self, cin: int, cout: int, bn_momentum: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.pool(self.conv1(x))))
        return self.act(self.bn2(self.conv2(x)))


def _dirac_init(conv: nn.Conv2d) -> None:
    """Make the first ``min(in, out)`` filters identities: at init a stage passes its input on."""
    with torch.no_grad():
        n = min(conv.in_channels, conv.out_channels)
        nn.init.dirac_(conv.weight[:n])


class FastNet(SymModel):
    """Normalize → whitening conv 2×2 (±filters, frozen) → GELU → 3 stages → global max-pool → SymHead.

    Args:
        hidden: h, the hidden width of the head.
        act, act_kwargs: the head's hidden activation σ.
        widths: output channels of the three stages.
        whiten_size: patch side of the whitening convolution.
        whiten_eps: ``eps`` of :func:`patch_whitening`.
        bn_momentum: BatchNorm running-statistics momentum (fast, as airbench's lookahead wants).
        dirac: identity-initialize the first filters of every 3×3 conv.
        tta_flip: in eval mode, average the features of each image and its mirror image.
        num_classes: C.

    The whitening filters are set by :meth:`init_from_data` (``symensemble train`` calls it on
    the recipe's ``init_samples`` training images); until then they are random.
    """

    def __init__(
        self,
        hidden: int = 128,
        act: str = "leaky_relu",
        act_kwargs: dict[str, Any] | None = None,
        widths: Sequence[int] = (64, 256, 256),
        whiten_size: int = 2,
        whiten_eps: float = 5e-4,
        bn_momentum: float = 0.4,
        dirac: bool = True,
        tta_flip: bool = True,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        widths = tuple(widths)
        if len(widths) != 3 or not all(isinstance(w, int) and w >= 1 for w in widths):
            raise ValueError(f"widths must be 3 positive integers, got {widths!r}")
        if not 0 < bn_momentum <= 1:
            raise ValueError(f"bn_momentum must be in (0, 1], got {bn_momentum!r}")
        self.normalize = Normalize()
        half = 3 * whiten_size**2
        self.whiten = nn.Conv2d(3, 2 * half, whiten_size)
        self.whiten.weight.requires_grad_(False)  # fixed whitening; its bias is trained
        self.whiten_eps = whiten_eps
        self.stages = nn.Sequential(*(_Stage(cin, cout, bn_momentum)
                                      for cin, cout in zip((2 * half, *widths[:2]), widths)))
        if dirac:
            for stage in self.stages:
                _dirac_init(stage.conv1)
                _dirac_init(stage.conv2)
        self.act = nn.GELU()
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.tta_flip = tta_flip
        self.head = SymHead(widths[-1], hidden, num_classes, act, act_kwargs)

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Set the whitening filters from training images (uint8 or [0, 1] floats, (N, 3, H, W))."""
        x = images.float().div(255) if images.dtype == torch.uint8 else images.float()
        weight, bias = patch_whitening(self.normalize(x), self.whiten.kernel_size[0], self.whiten_eps)
        self.whiten.weight.copy_(torch.cat([weight, -weight]).to(self.whiten.weight))
        self.whiten.bias.copy_(torch.cat([bias, -bias]).to(self.whiten.bias))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.act(self.whiten(x)))).flatten(1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if self.training or not self.tta_flip:
            return self._features(x)
        both = self._features(torch.cat([x, x.flip(-1)]))  # one batch for both views
        return 0.5 * (both[: x.shape[0]] + both[x.shape[0] :])


@register_model("fast_net")
def fast_net(**kwargs: Any) -> FastNet:
    return FastNet(**kwargs)
