"""Seconds per epoch of symensemble's training loop vs a minimal hand-written PyTorch loop.

Both train the paper CNN with the paper recipe (Adam 1e-3, batch 32, no augmentation) for one
epoch on the same data and then evaluate on the validation and test splits, as
`symensemble train` does every epoch. Runs alternate (ours, plain, ours, plain, ...) so that
background load hits both alike, after one discarded warm-up run of each; the JSON reports
the median of each and their ratio.

    python benchmarks/train_epoch.py [--data PATH] [--repeats 5] [--threads N]

With ``--ddp N`` it instead compares data-parallel training under torchrun: one epoch of the
same recipe in N gloo processes on the CPU against one process, alternating, and reports the
median training time of an epoch (``train_seconds`` of the run's log: the epoch's steps, without
process start, data loading or evaluation) of each and their ratio. Every rank gets
``cores // N`` threads unless ``--threads`` says otherwise; the single process keeps torch's
default (all cores) unless ``--threads`` is given, when it gets that many too. On a machine with
few cores no speed-up is expected: the figure shows DDP's overhead. On a busy machine compare
both settings: there a multi-threaded single process can lose far more to oversubscription
than DDP costs.

    python benchmarks/train_epoch.py --ddp 2 [--data PATH] [--repeats 3]

Without CIFAR-10 data (``--data`` or ``$SYMENSEMBLE_DATA``) it uses random images of the same size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr

import torch
import torch.nn.functional as F

from symensemble.data import CIFAR10, DataError, Split, load_cifar10
from symensemble.models import create_model
from symensemble.training.loop import train
from symensemble.training.recipe import Recipe


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


def load_data(source: str | None, recipe: Recipe) -> CIFAR10:
    """CIFAR-10 from ``source``, or random images of the same size when there is none."""
    try:
        return load_cifar10(source, val_size=recipe.val_size, seed=recipe.seed)
    except DataError:
        g = torch.Generator().manual_seed(0)

        def rand(n: int) -> Split:
            return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                         torch.randint(0, 10, (n,), generator=g))

        return CIFAR10(rand(45000), rand(5000), rand(10000), tuple("0123456789"), "random")


def worker(args: argparse.Namespace) -> None:
    """One process of a timed run (alone, or one rank under torchrun): train, rank 0 writes the log."""
    recipe = Recipe(epochs=1)
    train(recipe, data=load_data(args.data, recipe), out=args.worker, device="cpu", progress=False)
    from symensemble.distributed import shutdown

    shutdown()


def timed_run(args: argparse.Namespace, processes: int, out: str) -> dict:
    """Run :func:`worker` in ``processes`` processes; the epoch's figures from the log it wrote."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", out]
    cmd += ["--data", args.data] if args.data else []
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(processes), *cmd[1:]]
        env["OMP_NUM_THREADS"] = str(args.threads or max(1, (os.cpu_count() or 1) // processes))
    elif args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(out.replace(".safetensors", ".log.json")) as fh:
        log = json.load(fh)
    return {"data": log["data_source"], **log["epochs"][0]}


def ddp_main(args: argparse.Namespace) -> None:
    single, parallel = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # alternate, so background load hits both alike
            single.append(timed_run(args, 1, os.path.join(tmp, f"one{i}.safetensors")))
            parallel.append(timed_run(args, args.ddp, os.path.join(tmp, f"ddp{i}.safetensors")))

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    result = {
        "benchmark": "train_epoch_ddp",
        "model": "paper_cnn",
        "recipe": "Adam 1e-3, global batch 32, 1 epoch",
        "data": single[0]["data"],
        "processes": args.ddp,
        "backend": "gloo",
        "cpu_count": os.cpu_count(),
        "threads_per_rank": args.threads or max(1, (os.cpu_count() or 1) // args.ddp),
        "repeats": args.repeats,
        "single_train_seconds": [r["train_seconds"] for r in single],
        "ddp_train_seconds": [r["train_seconds"] for r in parallel],
        "single_median_s": median(single, "train_seconds"),
        "ddp_median_s": median(parallel, "train_seconds"),
        "ratio": median(parallel, "train_seconds") / median(single, "train_seconds"),
        "epoch_ratio_with_eval": median(parallel, "epoch_seconds") / median(single, "epoch_seconds"),
        "test_accuracy": {"single": [r["test_accuracy"] for r in single],
                          "ddp": [r["test_accuracy"] for r in parallel]},
    }
    json.dump(result, sys.stdout, indent=2)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--repeats", type=int, default=None, help="[default: 5, or 3 with --ddp]")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ddp", type=int, default=None, metavar="N",
                        help="time N gloo processes under torchrun against one process")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.ddp is not None:
        if args.ddp < 2:
            parser.error(f"--ddp needs at least 2 processes, got {args.ddp}")
        args.repeats = args.repeats or 3
        return ddp_main(args)
    args.repeats = args.repeats or 5
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe(epochs=1)  # the paper recipe
    data = load_data(args.data, recipe)
    source = data.source
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
