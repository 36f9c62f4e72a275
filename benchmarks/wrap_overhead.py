"""Cost of a G = 50 symmetry ensemble over a wrapped pretrained-style model (issue #18).

For a spatial head Z (B, C, H, W) → σ → global average pooling → Linear, the backbone runs once
per batch and member k adds σ(g_k Z) at every position: G·HW·C² multiply-adds per image (plus
G·C·classes for W_k). So the forward can at best cost

    limit = 1 + G·HW·C² / (backbone multiply-adds per image)

times the model's. This script times both (float32 members, the default for spatial heads;
default aggregate, the vote, under ``torch.no_grad``) on torchvision's ``resnet18`` (C = 512,
1×1 map at 32×32) and a WideResNet-28-10 (C = 640, 8×8 map), random weights. Members are
drawn with ``ginv`` (no calibration pass: a WRN ``group`` build runs the backbone over
G·2C = 64,000 images); their forward is exactly the ``group`` members' work.

Prints one JSON object: per model, ``model_s`` and ``ensemble_s`` (median seconds over interleaved
rounds), ``ratio`` (median of per-round ratios), ``flop_limit`` and ``ratio_over_limit``, the
backbone's multiply-adds (``torch.utils.flop_counter``) and the shapes.

Usage::

    python benchmarks/wrap_overhead.py [--members 50] [--batch 32] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from symensemble.ensembles.ensemble import SymmetryEnsemble  # noqa: E402


class _Block(nn.Module):
    """RobustBench's pre-activation WideResNet block."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = self.relu1(self.bn1(x))
        y = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-widen for 32×32 inputs (RobustBench layout: F.avg_pool2d(out, 8), view, fc)."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        layers = []
        for i, stride in enumerate((1, 2, 2)):
            layers += [_Block(widths[i] if j == 0 else widths[i + 1], widths[i + 1], stride if j == 0 else 1)
                       for j in range(n)]
        self.blocks = nn.Sequential(*layers)
        self.bn1, self.relu = nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True)
        self.fc, self.channels = nn.Linear(widths[3], num_classes), widths[3]

    def forward(self, x):
        out = self.relu(self.bn1(self.blocks(self.conv1(x))))
        return self.fc(F.avg_pool2d(out, 8).view(-1, self.channels))


def _macs(model: nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    return counter.get_total_flops() / 2


def _time(fn, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn(x)
    return time.perf_counter() - start


def bench(name: str, model: nn.Module, args: argparse.Namespace) -> dict:
    model.eval()
    x = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ens = SymmetryEnsemble.from_model(model, x[:8], num_members=args.members, eps=1.0, transform="ginv")
    C = ens.hidden_features
    with torch.no_grad():
        Z = ens._parts.hidden(x[:1])
    hw = int(Z[0, 0].numel())
    backbone = _macs(model, x)
    limit = 1 + args.members * hw * C * C / backbone
    _time(model, x), _time(ens, x)  # warm up
    m_s, e_s, ratios = [], [], []
    for _ in range(args.repeats):  # interleaved rounds: a busy machine slows both alike
        m, e = _time(model, x), _time(ens, x)
        m_s.append(m), e_s.append(e), ratios.append(e / m)
    ratio = statistics.median(ratios)
    return {"model": name, "C": C, "HW": hw, "members": args.members, "batch": args.batch,
            "backbone_macs_per_image": backbone, "member_macs_per_image": args.members * hw * C * C,
            "model_s": statistics.median(m_s), "ensemble_s": statistics.median(e_s),
            "ratio": ratio, "flop_limit": limit, "ratio_over_limit": ratio / limit,
            "head_dtype": str(ens.head_dtype)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="resnet18,wrn28_10")
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # a script, not a library: the caller's choice is this flag
    torch.manual_seed(0)
    makers = {
        "resnet18": lambda: __import__("torchvision").models.resnet18(num_classes=10),
        "wrn28_10": lambda: WideResNet(28, 10),
    }
    results = [bench(name, makers[name](), args) for name in args.models.split(",")]
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "results": results},
                     indent=2))


if __name__ == "__main__":
    main()
