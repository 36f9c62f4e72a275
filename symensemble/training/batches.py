"""Batches for training and evaluation: uint8 splits on their device → float [0, 1] batches.

Shuffling and the standard CIFAR-10 augmentation (random crop with zero padding, random
horizontal flip) draw from an explicit CPU generator, so a run is reproducible from its seed
and a resumed run replays the same batches (:mod:`.loop` seeds one generator per epoch).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..data import Split

__all__ = ["augment_batch", "iterate_batches"]


def augment_batch(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, batch-wise.

    Shape:
        images (B, C, H, W) → (B, C, H, W), same dtype and device.
    """
    b, c, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    off = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(device)
    rows = (off[0, :, None] + torch.arange(h, device=device))[:, None, :, None]
    cols = off[1, :, None] + torch.arange(w, device=device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(b, device=device)[:, None, None, None]
    chan = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float images in [0, 1], labels) batches from a split already on its device.

    Shuffling and augmentation draw from ``generator`` (a CPU generator), so a run is
    reproducible from its seed; without one they draw a seed from the global RNG.
    """
    n = len(split)
    if generator is None and (shuffle or augment):
        # One stream per call, seeded from the global RNG (a fresh default Generator would
        # repeat the same crops every batch).
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    if shuffle:
        order = torch.randperm(n, generator=generator).to(split.labels.device)
    else:
        order = None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
        x = split.images[idx]
        if augment:
            x = augment_batch(x, generator)
        yield x.float().div_(255), split.labels[idx]
