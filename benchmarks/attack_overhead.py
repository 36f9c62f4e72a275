"""Overhead of the evaluation harness and of attacking an ensemble, printed as JSON.

Claims measured (one run, same machine, one warm-up, then interleaved repeats in alternating
order; ratios of the medians over ``--repeats``, robust to a background process stealing a
core now and then — the minima are reported too):

1. ``evaluate_vs_torchattacks``: PGD-10 (eps 8/255, step 2/255) through
   ``symensemble.evaluate`` divided by torchattacks' ``PGD`` called directly on the same model,
   images and batches, accuracy counting included in both (target ≤ 1.05).
2. ``ensemble_vs_single``: adaptive PGD-10 on a 200-member ``group`` ensemble (through its
   differentiable ``mean`` aggregate, as the adaptive threat model runs it) divided by PGD-10
   on the single model (target ≤ 1.5). Ensemble construction is timed separately.
3. ``portfolio_group_vs_base``: every attack of the default portfolio (transfer PGD-20 and
   FGSM, APGD-CE, APGD-DLR, APGD on the soft vote; ``--portfolio-steps`` iterations each) on
   the same images, on the group ensemble divided by on the base model (target ≤ 1.5). The
   cascade is off here so both see the same images: the ratio is the cost per image.

Uses the shipped ``paper_cnn`` checkpoint and CIFAR-10 test images when present, else a
randomly initialized paper CNN and random images (the timing does not depend on weights).

    python benchmarks/attack_overhead.py [--n 500] [--batch-size 250] [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch
import torchattacks

import symensemble as se
from symensemble.ensembles.ensemble import default_samples_per_member
from symensemble.robustness.attacks.grid import get_attack
from symensemble.robustness.attacks.portfolio import portfolio_components
from symensemble.robustness.evaluation import evaluate, stratified_subset
from symensemble.robustness.threats import DifferentiableView

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10


def _model(device: str):
    try:
        return se.load_model("paper_cnn", device=device), "checkpoint:paper_cnn"
    except (ValueError, OSError):
        torch.manual_seed(0)
        return se.create_model("paper_cnn").to(device).eval(), "random-init paper_cnn"


def _data(n_min: int):
    try:
        data = se.load_cifar10(val_size=0)
        return data, f"cifar10 ({data.source})"
    except ValueError:
        gen = torch.Generator().manual_seed(0)
        split = SimpleNamespace(
            images=torch.randint(0, 256, (max(n_min, 4000), 3, 32, 32), generator=gen,
                                 dtype=torch.uint8),
            labels=torch.arange(10).repeat_interleave(max(n_min, 4000) // 10))
        return SimpleNamespace(train=split, test=split, classes=tuple(range(10)),
                               source="random"), "random images"


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="test images")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant")
    parser.add_argument("--members", type=int, default=200, help="ensemble size G")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--portfolio-steps", type=int, default=20,
                        help="APGD iterations per attack in the portfolio timing")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, model_source = _model(args.device)
    data, data_source = _data(args.n)
    idx = stratified_subset(data.test.labels, args.n, seed=0)
    x_all = data.test.images[idx].float().div(255)
    y_all = data.test.labels[idx]
    batches = [(x_all[i:i + args.batch_size].to(args.device),
                y_all[i:i + args.batch_size].to(args.device))
               for i in range(0, args.n, args.batch_size)]

    def direct() -> float:
        correct = 0
        for b, (x, y) in enumerate(batches):
            torch.manual_seed(b)
            adv = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS)(x, y)
            with torch.no_grad():
                correct += int((model(adv).argmax(1) == y).sum())
        return correct / args.n

    def harness() -> float:
        result = evaluate(model, data, n=args.n, attack="pgd", eps=[EPS], steps=[STEPS],
                          alpha=ALPHA, transforms=["original"], threat=["transfer"],
                          sanity=False, batch_size=args.batch_size, device=args.device)
        return result.records[0].accuracy

    direct(), harness()  # warm-up (allocator, thread pool, lazy imports), not timed
    t_direct, t_harness = [], []
    acc_direct = acc_harness = None
    for rep in range(args.repeats):  # interleaved, alternating order, best of the repeats
        for which in ((direct, harness) if rep % 2 == 0 else (harness, direct)):
            t, acc = _timed(which)
            if which is direct:
                t_direct.append(t)
                acc_direct = acc
            else:
                t_harness.append(t)
                acc_harness = acc

    # adaptive PGD-10 on a G-member group ensemble vs the single model
    cal = data.train.images[torch.randperm(len(data.train.labels),
                                           generator=torch.Generator().manual_seed(1))]
    h = model.head.hidden_features
    s = default_samples_per_member(h)
    cal = cal[: args.members * s].float().div(255).to(args.device)
    t_build, ens = _timed(lambda: se.SymmetryEnsemble(model, cal, num_members=args.members,
                                                      eps=10.0, transform="group", seed=0,
                                                      aggregate="vote"))
    view = DifferentiableView(ens, "mean")
    preset = get_attack("pgd")

    def attack_all(target) -> None:
        for b, (x, y) in enumerate(batches):
            torch.manual_seed(b)
            preset.build(target, eps=EPS, steps=STEPS, alpha=ALPHA)(x, y)

    attack_all(model), attack_all(view)  # warm-up
    t_single, t_ens = [], []
    for rep in range(args.repeats):
        order = ((model, t_single), (view, t_ens))
        for target, times in (order if rep % 2 == 0 else order[::-1]):
            times.append(_timed(lambda target=target: attack_all(target))[0])

    t_port_base, t_port_ens = _portfolio_times(model, ens, batches, args)

    report = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "model": model_source,
        "data": data_source,
        "n": args.n,
        "batch_size": args.batch_size,
        "attack": f"PGD-{STEPS}, eps=8/255, alpha=2/255",
        "repeats": args.repeats,
        "evaluate_vs_torchattacks": {
            "torchattacks_direct_s": round(statistics.median(t_direct), 3),
            "symensemble_evaluate_s": round(statistics.median(t_harness), 3),
            "ratio": round(statistics.median(t_harness) / statistics.median(t_direct), 3),
            "ratio_of_minima": round(min(t_harness) / min(t_direct), 3),
            "target": 1.05,
            "accuracy_direct": acc_direct,
            "accuracy_evaluate": acc_harness,
            "all_direct_s": [round(t, 3) for t in t_direct],
            "all_evaluate_s": [round(t, 3) for t in t_harness],
        },
        "ensemble_vs_single": {
            "members": args.members,
            "transform": "group",
            "ensemble_eps": 10.0,
            "head_dtype": str(ens.head_dtype),
            "ensemble_build_s": round(t_build, 3),
            "single_model_pgd_s": round(statistics.median(t_single), 3),
            "ensemble_adaptive_pgd_s": round(statistics.median(t_ens), 3),
            "ratio": round(statistics.median(t_ens) / statistics.median(t_single), 3),
            "ratio_of_minima": round(min(t_ens) / min(t_single), 3),
            "target": 1.5,
            "all_single_s": [round(t, 3) for t in t_single],
            "all_ensemble_s": [round(t, 3) for t in t_ens],
        },
    }
    report["portfolio_group_vs_base"] = {
        "apgd_steps": args.portfolio_steps,
        "attacks": [c.name for c in portfolio_components(apgd_steps=args.portfolio_steps)],
        "base_s": round(statistics.median(t_port_base), 3),
        "group_ensemble_s": round(statistics.median(t_port_ens), 3),
        "ratio": round(statistics.median(t_port_ens) / statistics.median(t_port_base), 3),
        "ratio_of_minima": round(min(t_port_ens) / min(t_port_base), 3),
        "target": 1.5,
    }
    print(json.dumps(report, indent=2))


def _portfolio_times(model, ens, batches, args) -> tuple[list[float], list[float]]:
    """Seconds to run every portfolio attack on every batch, per target (interleaved)."""
    comps = portfolio_components(apgd_steps=args.portfolio_steps)

    def run(target) -> None:
        for b, (x, y) in enumerate(batches):
            for c in comps:
                src = model if c.shared else target  # transfer: crafted on the base model
                for adv in c.candidates(src, x, y, eps=EPS, seed=b, stochastic=False,
                                        eot_iter=1, attack_aggregate="mean"):
                    with torch.no_grad():
                        target(adv)

    run(model), run(ens)  # warm-up
    t_base, t_ens = [], []
    for rep in range(max(1, args.repeats // 2)):
        order = ((model, t_base), (ens, t_ens))
        for target, times in (order if rep % 2 == 0 else order[::-1]):
            times.append(_timed(lambda target=target: run(target))[0])
    return t_base, t_ens


if __name__ == "__main__":
    main()
