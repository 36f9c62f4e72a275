"""Cost of a 200-member symmetry ensemble over the single model (paper_cnn, CPU, one process).

Claim (issue #3): the backbone runs once per batch and the members run as one batched float64
matrix product, so on 1,000 test images the ensemble's forward takes ≤ 1.10× the single model's,
drawing 200 ``group`` members takes ≤ 1 s, and the extra memory is a bounded chunk buffer.

Prints one JSON object:

* ``forward``: median seconds of the model and of the ensemble (aggregate ``mean`` and ``vote``,
  and ``mean`` with a float32 head) on the same batch, timed in interleaved pairs; ``ratio`` is
  the median of the per-pair ratios (robust to a busy machine), ``ratio_min`` the ratio of the
  fastest runs.
* ``calibration``: seconds to build the ensemble — ``total_s`` including the backbone pass over
  the 200·16 calibration images, ``draw_s`` for drawing the members alone (``resample``).
* ``memory``: peak resident memory (MiB) during one forward of each, from ``VmHWM`` after
  resetting it (Linux), and the ensemble's per-chunk scratch bound.

Usage::

    python benchmarks/ensemble_overhead.py [--checkpoint paper_cnn] [--data PATH] [--repeats 15]

Without the checkpoint a randomly initialized paper_cnn is timed (the cost does not depend on
the weights); without CIFAR-10 (``--data`` or ``$SYMENSEMBLE_DATA``) uniform random images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import symensemble  # noqa: E402
from symensemble.ensemble import SymmetryEnsemble  # noqa: E402


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _load(checkpoint: str, data: str | None, n_test: int, n_cal: int):
    try:
        model = symensemble.load_model(checkpoint)
        source = checkpoint
    except ValueError:
        model = symensemble.create_model("paper_cnn").eval()
        source = "random-init paper_cnn (checkpoint not found)"
    data = data or os.environ.get("SYMENSEMBLE_DATA")
    try:
        from symensemble.data import load_cifar10

        d = load_cifar10(data) if data else load_cifar10()
        test = d.test.images[:n_test].float() / 255
        cal = d.train.images[:n_cal]
        images = "cifar10"
    except Exception:  # noqa: BLE001 - any missing data falls back to random images
        g = torch.Generator().manual_seed(0)
        test = torch.rand(n_test, 3, 32, 32, generator=g)
        cal = torch.rand(n_cal, 3, 32, 32, generator=g)
        images = "uniform random"
    return model, source, test, cal, images


def _time(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="paper_cnn", help="checkpoint path or shipped name")
    parser.add_argument("--data", default=None, help="CIFAR-10 source (default $SYMENSEMBLE_DATA)")
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--eps", type=float, default=10.0)
    parser.add_argument("--images", type=int, default=1000, help="test images per forward")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    model, source, x, cal, images = _load(
        args.checkpoint, args.data, args.images, args.members * 16
    )
    h = model.head.hidden_features

    t = time.perf_counter()
    ens = SymmetryEnsemble(model, cal, num_members=args.members, eps=args.eps, transform="group")
    total_s = time.perf_counter() - t
    draws = []
    for seed in range(5):
        t = time.perf_counter()
        ens.resample(seed=seed)
        draws.append(time.perf_counter() - t)
    ens.resample(seed=0)
    ens32 = SymmetryEnsemble(
        model, cal, num_members=args.members, eps=args.eps, head_dtype=torch.float32
    )

    def ens_mean(inp):
        ens.aggregate = "mean"
        return ens(inp)

    def ens_vote(inp):
        ens.aggregate = "vote"
        return ens(inp)

    runs = {
        "model": model,
        "ensemble_mean": ens_mean,
        "ensemble_vote": ens_vote,
        "ensemble_mean_float32_head": ens32,
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn(x)
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(_time(fn, x))

    def ratio(name: str) -> dict[str, float]:
        pairs = [e / b for e, b in zip(times[name], times["model"], strict=True)]
        return {
            "ratio": statistics.median(pairs),
            "ratio_min": min(times[name]) / min(times["model"]),
        }

    memory: dict[str, float | None] = {}
    with torch.inference_mode():
        for name in ("model", "ensemble_mean", "ensemble_vote"):
            ok = _reset_peak_rss()
            runs[name](x)
            memory[f"{name}_peak_rss_mib"] = _peak_rss_mib() if ok else None
    C = model.head.num_classes
    chunk = max(1, ens.max_chunk_bytes // (x.shape[0] * (2 * h + 2 * C) * 8))
    memory["ensemble_chunk_members"] = min(chunk, args.members)
    memory["ensemble_chunk_scratch_mib"] = (
        min(chunk, args.members) * x.shape[0] * (2 * h + 2 * C) * 8 / 2**20
    )

    out = {
        "benchmark": "ensemble_overhead",
        "model": source,
        "images": f"{x.shape[0]} {images}",
        "members": args.members,
        "eps": args.eps,
        "hidden": h,
        "transform": "group",
        "head_dtype": "float64",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "forward": {
            "model_s": statistics.median(times["model"]),
            **{f"{k}_s": statistics.median(v) for k, v in times.items() if k != "model"},
            "mean": ratio("ensemble_mean"),
            "vote": ratio("ensemble_vote"),
            "mean_float32_head": ratio("ensemble_mean_float32_head"),
            "target_ratio": 1.10,
        },
        "calibration": {
            "total_s": total_s,
            "draw_s": statistics.median(draws),
            "calibration_images": args.members * 16,
            "target_s": 1.0,
        },
        "memory": memory,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
