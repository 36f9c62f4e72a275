"""Seconds per epoch of symensemble's training loop vs a minimal hand-written PyTorch loop.

Both train the paper CNN with the paper recipe (Adam 1e-3, batch 32, no augmentation) for one
epoch on the same data and then evaluate on the validation and test splits, as
`symensemble train` does every epoch. Runs alternate (ours, plain, ours, plain, ...) so that
background load hits both alike, after one discarded warm-up run of each; the JSON reports
the median of each and their ratio.

    python benchmarks/train_epoch.py [--data PATH] [--repeats 5] [--threads N]

Without CIFAR-10 data (``--data`` or ``$SYMENSEMBLE_DATA``) it uses random images of the same size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stderr

import torch
import torch.nn.functional as F

from symensemble.data import CIFAR10, DataError, Split, load_cifar10
from symensemble.models import create_model
from symensemble.recipe import Recipe
from symensemble.train import train


def plain_epoch(data: CIFAR10, recipe: Recipe) -> float:
    """The baseline: the shortest correct PyTorch loop with the same settings."""
    torch.manual_seed(recipe.seed)
    model = create_model(recipe.model, **recipe.model_config())
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    t0 = time.perf_counter()
    model.train()
    perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(recipe.seed))
    for i in range(0, len(perm), recipe.batch_size):
        idx = perm[i : i + recipe.batch_size]
        x, y = data.train.images[idx].float() / 255, data.train.labels[idx]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        for split in (data.val, data.test):
            correct = 0
            for i in range(0, len(split), recipe.eval_batch_size):
                x = split.images[i : i + recipe.eval_batch_size].float() / 255
                correct += (model(x).argmax(1) == split.labels[i : i + recipe.eval_batch_size]).sum().item()
    return time.perf_counter() - t0


def ours_epoch(data: CIFAR10, recipe: Recipe) -> float:
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as null, redirect_stderr(null):
        t0 = time.perf_counter()
        train(recipe, data=data, out=os.path.join(tmp, "m.safetensors"), device="cpu", progress=True)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe(epochs=1)  # the paper recipe
    try:
        data = load_cifar10(args.data, val_size=recipe.val_size, seed=recipe.seed)
        source = data.source
    except DataError:
        g = torch.Generator().manual_seed(0)

        def rand(n: int) -> Split:
            return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                         torch.randint(0, 10, (n,), generator=g))

        data, source = CIFAR10(rand(45000), rand(5000), rand(10000), tuple("0123456789"), "random"), "random"
    ours_epoch(data, recipe)  # warm-up: first-call allocations and lazy imports hit whichever runs first
    plain_epoch(data, recipe)
    ours, plain = [], []
    for _ in range(args.repeats):
        ours.append(ours_epoch(data, recipe))
        plain.append(plain_epoch(data, recipe))
    result = {
        "benchmark": "train_epoch",
        "model": "paper_cnn",
        "recipe": "Adam 1e-3, batch 32, 1 epoch + val/test evaluation",
        "data": source,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "symensemble_seconds": ours,
        "plain_seconds": plain,
        "symensemble_median_s": statistics.median(ours),
        "plain_median_s": statistics.median(plain),
        "ratio": statistics.median(ours) / statistics.median(plain),
        "target_ratio": 1.05,
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
