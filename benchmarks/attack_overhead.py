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
3. ``portfolio_group_vs_base``: every attack of the default portfolio (``--portfolio-steps``
   APGD iterations each) on the same images, on the group ensemble divided by on the base
   model (target ≤ 1.5). The cascade is off here so both see the same images: the ratio is
   the cost per image.
4. ``early_stop``: the default portfolio through ``symensemble.evaluate`` (``--es-n`` images,
   ``--es-transforms``, ``--es-eps``) with early stop on and off: seconds of each, their
   ratio (target ≤ 0.5 on the full default run) and whether records and per-image flags are
   identical (they must be). ``--only-early-stop`` runs only this part.

Uses the shipped ``paper_cnn`` checkpoint and CIFAR-10 test images when present, else a
randomly initialized paper CNN and random images (the timing does not depend on weights).

    python benchmarks/attack_overhead.py [--n 500] [--batch-size 250] [--repeats 7] [--threads 2]
    python benchmarks/attack_overhead.py --only-early-stop --es-n 500 \
        --es-transforms original,group,ginv,random,shuffle,perm_interp --es-eps 0,0.006,0.012,8/255
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
from symensemble.robustness.attacks import get_attack, portfolio_attacks
from symensemble.robustness.config import EvalConfig
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


def _interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each zero-argument function over ``repeats`` rounds, alternating order."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(repeats):
        for key in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
            times[key].append(_timed(fns[key])[0])
    return times


def _ratio(num: list[float], den: list[float], target: float) -> dict:
    return {"ratio": round(statistics.median(num) / statistics.median(den), 3),
            "ratio_of_minima": round(min(num) / min(den), 3), "target": target}


def _harness_vs_direct(model, data, batches, args) -> dict:
    """Claim 1: ``evaluate`` against torchattacks' PGD called directly."""
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

    acc = {"direct": direct(), "evaluate": harness()}  # warm-up, not timed
    t = _interleaved({"direct": direct, "evaluate": harness}, args.repeats)
    return {"torchattacks_direct_s": round(statistics.median(t["direct"]), 3),
            "symensemble_evaluate_s": round(statistics.median(t["evaluate"]), 3),
            **_ratio(t["evaluate"], t["direct"], 1.05),
            "accuracy_direct": acc["direct"], "accuracy_evaluate": acc["evaluate"],
            "all_direct_s": [round(v, 3) for v in t["direct"]],
            "all_evaluate_s": [round(v, 3) for v in t["evaluate"]]}


def _ensemble(model, data, args):
    cal = data.train.images[torch.randperm(len(data.train.labels),
                                           generator=torch.Generator().manual_seed(1))]
    s = default_samples_per_member(model.head.hidden_features)
    cal = cal[: args.members * s].float().div(255).to(args.device)
    return _timed(lambda: se.SymmetryEnsemble(model, cal, num_members=args.members, eps=10.0,
                                              transform="group", seed=0, aggregate="vote"))


def _ensemble_vs_single(model, ens, batches, args) -> dict:
    """Claim 2: adaptive PGD-10 on the ensemble's ``mean`` aggregate against the single model."""
    view = DifferentiableView(ens, "mean")
    pgd = get_attack("pgd", steps=STEPS, alpha=ALPHA)

    def attack_all(target) -> None:
        for b, (x, y) in enumerate(batches):
            pgd(target, x, y, eps=EPS, seed=b)

    attack_all(model), attack_all(view)  # warm-up
    t = _interleaved({"single": lambda: attack_all(model), "ens": lambda: attack_all(view)},
                     args.repeats)
    return {"members": args.members, "transform": "group", "ensemble_eps": 10.0,
            "head_dtype": str(ens.head_dtype),
            "single_model_pgd_s": round(statistics.median(t["single"]), 3),
            "ensemble_adaptive_pgd_s": round(statistics.median(t["ens"]), 3),
            **_ratio(t["ens"], t["single"], 1.5),
            "all_single_s": [round(v, 3) for v in t["single"]],
            "all_ensemble_s": [round(v, 3) for v in t["ens"]]}


def _portfolio_group_vs_base(model, ens, batches, args) -> dict:
    """Claim 3: every portfolio attack on every batch, per target, cascade off."""
    attacks = portfolio_attacks(EvalConfig(apgd_steps=args.portfolio_steps, eot_iter=1))

    def run(target) -> None:
        for b, (x, y) in enumerate(batches):
            for attack in attacks:
                src = model if attack.shared else target  # transfer: crafted on the base model
                for adv in attack(src, x, y, eps=EPS, seed=b):
                    with torch.no_grad():
                        target(adv)

    run(model), run(ens)  # warm-up
    t = _interleaved({"base": lambda: run(model), "ens": lambda: run(ens)},
                     max(1, args.repeats // 2))
    return {"apgd_steps": args.portfolio_steps, "attacks": [a.name for a in attacks],
            "base_s": round(statistics.median(t["base"]), 3),
            "group_ensemble_s": round(statistics.median(t["ens"]), 3),
            **_ratio(t["ens"], t["base"], 1.5)}


def _early_stop(model, data, args) -> dict:
    """Claim 4: the default portfolio with and without early stop; same records required."""
    kw = dict(n=args.es_n, transforms=args.es_transforms.split(","), eps=args.es_eps,
              batch_size=args.batch_size, device=args.device)
    t_on, on = _timed(lambda: evaluate(model, data, early_stop=True, **kw))
    t_off, off = _timed(lambda: evaluate(model, data, early_stop=False, **kw))
    same_flags = on.flags.keys() == off.flags.keys() and all(
        torch.equal(on.flags[k], off.flags[k]) for k in on.flags)
    return {"n": args.es_n, "transforms": kw["transforms"], "eps": list(on.config.eps),
            "attacks": [a.name for a in portfolio_attacks(on.config)],
            "early_stop_s": round(t_on, 3), "no_early_stop_s": round(t_off, 3),
            "ratio": round(t_on / t_off, 3), "target": 0.5,
            "identical_records": on.records == off.records, "identical_flags": same_flags,
            "robust": {f"{r.transform}@{r.eps:.4g}": r.accuracy for r in on.records
                       if r.threat == "robust" and r.eps > 0}}


def _args() -> argparse.Namespace:
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
    parser.add_argument("--es-n", type=int, default=100, help="early stop: test images")
    parser.add_argument("--es-transforms", default="original,group", help="early stop: targets")
    parser.add_argument("--es-eps", default="0,0.006", help="early stop: radii")
    parser.add_argument("--only-early-stop", action="store_true",
                        help="run only the early-stop comparison")
    return parser.parse_args()


def main() -> None:
    args = _args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, model_source = _model(args.device)
    data, data_source = _data(max(args.n, args.es_n))
    report = {"device": args.device, "threads": torch.get_num_threads(), "model": model_source,
              "data": data_source, "batch_size": args.batch_size}
    if not args.only_early_stop:
        idx = stratified_subset(data.test.labels, args.n, seed=0)
        x_all, y_all = data.test.images[idx].float().div(255), data.test.labels[idx]
        batches = [(x_all[i:i + args.batch_size].to(args.device),
                    y_all[i:i + args.batch_size].to(args.device))
                   for i in range(0, args.n, args.batch_size)]
        report.update(n=args.n, attack=f"PGD-{STEPS}, eps=8/255, alpha=2/255",
                      repeats=args.repeats)
        report["evaluate_vs_torchattacks"] = _harness_vs_direct(model, data, batches, args)
        t_build, ens = _ensemble(model, data, args)
        report["ensemble_vs_single"] = {**_ensemble_vs_single(model, ens, batches, args),
                                        "ensemble_build_s": round(t_build, 3)}
        report["portfolio_group_vs_base"] = _portfolio_group_vs_base(model, ens, batches, args)
    report["early_stop"] = _early_stop(model, data, args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
