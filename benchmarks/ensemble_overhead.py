"""Cost of a 200-member symmetry ensemble over the single model (paper_cnn, CPU, one process).

Claim (issue #3): the backbone runs once per batch and the members run as one batched float64
matrix product, so on 1,000 test images the ensemble's forward takes ≤ 1.10× the single model's,
building 200 ``group`` members takes ≤ 1 s, and the extra memory is a bounded chunk buffer.

Prints one JSON object:

* ``forward.wall``: median wall-clock seconds of the model and of the ensemble (aggregates
  ``mean``, ``vote``, and ``mean`` with a float32 head) on the same batch with the default
  threads, timed in interleaved rounds; ``ratio`` is the median of the per-round ratios (robust
  to a busy machine), ``ratio_min`` the ratio of the fastest runs.
* ``forward.cpu_1thread``: the same with one thread, in CPU seconds of that thread
  (``time.thread_time``) — insensitive to other processes sharing the cores.
* ``calibration``: seconds to build the ensemble — ``total_s`` including the backbone pass over
  the 200·16 calibration images, ``draw_s`` for drawing the members alone (``resample``).
* ``memory``: extra peak resident memory (MiB) of one forward over the memory before it, each
  measured in a fresh child process (Linux ``VmHWM``), and the ensemble's per-chunk scratch
  bound.

Usage::

    python benchmarks/ensemble_overhead.py [--checkpoint paper_cnn] [--data PATH] [--repeats 15]

Without the checkpoint a randomly initialized paper_cnn is timed (the cost does not depend on
the weights); without CIFAR-10 (``--data`` or ``$SYMENSEMBLE_DATA``), uniform random images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import symensemble  # noqa: E402
from symensemble.ensembles.ensemble import SymmetryEnsemble  # noqa: E402

# s = h = 16 for paper_cnn: the figures in docs/ensembles.md ("Cost") were measured with it, when
# it was the default (now 2h; a build then runs the backbone over twice the images)
CAL_PER_MEMBER = 16


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
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
        gen = torch.Generator().manual_seed(0)
        test = d.test.images[torch.randperm(len(d.test), generator=gen)[:n_test]].float() / 255
        cal = d.train.images[torch.randperm(len(d.train), generator=gen)[:n_cal]]
        images = "cifar10"
    except Exception:  # noqa: BLE001 - any missing data falls back to random images
        gen = torch.Generator().manual_seed(0)
        test = torch.rand(n_test, 3, 32, 32, generator=gen)
        cal = torch.rand(n_cal, 3, 32, 32, generator=gen)
        images = "uniform random"
    return model, source, test, cal, images


def _rounds(
    runs: dict[str, Callable], x: torch.Tensor, repeats: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn(x)
        for _ in range(repeats):
            for name, fn in runs.items():
                t = clock()
                fn(x)
                times[name].append(clock() - t)
    return times


def _summary(times: dict[str, list[float]]) -> dict[str, float]:
    out: dict[str, float] = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    for name in times:
        if name == "model":
            continue
        pairs = [e / b for e, b in zip(times[name], times["model"], strict=True)]
        out[f"{name}_ratio"] = statistics.median(pairs)
        out[f"{name}_ratio_min"] = min(times[name]) / min(times["model"])
    return out


def _memory_probe(args: argparse.Namespace, which: str) -> None:
    """Child process: extra peak RSS of one forward of ``which`` (model | mean | vote)."""
    model, _, x, cal, _ = _load(args.checkpoint, args.data, args.images, args.members * CAL_PER_MEMBER)
    fn: Callable = model
    if which != "model":
        fn = SymmetryEnsemble(model, cal, num_members=args.members, eps=args.eps, aggregate=which,
                              samples_per_member=CAL_PER_MEMBER)
    del cal
    before = _status_mib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        print(json.dumps(None))
        return
    with torch.inference_mode():
        fn(x)
    peak = _status_mib("VmHWM")
    print(json.dumps(None if before is None or peak is None else peak - before))


def _memory(args: argparse.Namespace) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for which in ("model", "mean", "vote"):
        cmd = [
            sys.executable,
            __file__,
            "--memory-probe",
            which,
            "--checkpoint",
            args.checkpoint,
            "--members",
            str(args.members),
            "--eps",
            str(args.eps),
            "--images",
            str(args.images),
        ]
        if args.data:
            cmd += ["--data", args.data]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
            value = json.loads(res.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, ValueError, IndexError):
            value = None
        key = "model" if which == "model" else f"ensemble_{which}"
        out[f"{key}_forward_peak_extra_mib"] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="paper_cnn", help="checkpoint path or shipped name")
    parser.add_argument("--data", default=None, help="CIFAR-10 source (default $SYMENSEMBLE_DATA)")
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--eps", type=float, default=10.0)
    parser.add_argument("--images", type=int, default=1000, help="test images per forward")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        _memory_probe(args, args.memory_probe)
        return

    n_cal = args.members * CAL_PER_MEMBER
    model, source, x, cal, images = _load(args.checkpoint, args.data, args.images, n_cal)
    h = model.head.hidden_features
    C = model.head.num_classes

    t = time.perf_counter()
    ens = SymmetryEnsemble(model, cal, num_members=args.members, eps=args.eps,
                           samples_per_member=CAL_PER_MEMBER)
    total_s = time.perf_counter() - t
    draws = []
    for seed in range(5):
        t = time.perf_counter()
        ens.resample(seed=seed)
        draws.append(time.perf_counter() - t)
    ens.resample(seed=0)
    ens_vote = SymmetryEnsemble(model, cal, args.members, args.eps, aggregate="vote",
                                samples_per_member=CAL_PER_MEMBER)
    ens32 = SymmetryEnsemble(model, cal, args.members, args.eps, head_dtype=torch.float32,
                             samples_per_member=CAL_PER_MEMBER)
    runs = {
        "model": model,
        "ensemble_mean": ens,
        "ensemble_vote": ens_vote,
        "ensemble_mean_float32_head": ens32,
    }
    threads = torch.get_num_threads()
    wall = _rounds(runs, x, args.repeats, time.perf_counter)
    torch.set_num_threads(1)
    try:
        cpu1 = _rounds(runs, x, max(3, args.repeats // 3), time.thread_time)
    finally:
        torch.set_num_threads(threads)

    chunk = min(args.members, max(1, ens.max_chunk_bytes // (x.shape[0] * (2 * h + 2 * C) * 8)))
    memory = _memory(args)
    memory["ensemble_chunk_members"] = chunk
    memory["ensemble_chunk_scratch_mib"] = chunk * x.shape[0] * (2 * h + 2 * C) * 8 / 2**20

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
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "forward": {
            "wall": _summary(wall),
            "cpu_1thread": _summary(cpu1),
            "target_ratio": 1.10,
        },
        "calibration": {
            "total_s": total_s,
            "draw_s": statistics.median(draws),
            "calibration_images": n_cal,
            "target_s": 1.0,
        },
        "memory": memory,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
