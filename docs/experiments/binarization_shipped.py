"""The binarization test (Zimmermann et al. 2022) on the shipped paper_cnn and its ensembles.

    python docs/experiments/binarization_shipped.py [N] [EPS] [TRANSFORMS] [PER_TARGET]

Runs the default portfolio (``se.evaluate``, vote, G = 200, ε = 10, seed 0) on N test images at
radius EPS, rebuilds the same targets, and runs :func:`binarization_test` with the portfolio's
APGD-CE on up to PER_TARGET images each target left robust. Prints one JSON line per target
(robust, tested, valid, failed, invalid, seconds); docs/attacks.md quotes
``100 0.006 original,group,ginv,random,shuffle,perm_interp 10``.
"""

import json
import sys
import time

import torch

import symensemble as se
from symensemble.robustness.attacks import AggregateView
from symensemble.robustness.binarization import binarization_test, registry_attack
from symensemble.robustness.config import EvalConfig
from symensemble.robustness.targets import load_targets, split_tensors, stratified_subset
from symensemble.vocab import parse_eps


def main(n: int, eps: float, transforms: list[str], per_target: int) -> None:
    t0 = time.time()
    config = EvalConfig(n=n, eps=[0.0, eps], transforms=transforms, sanity=False, seed=0)
    result = se.evaluate("paper_cnn", None, config)
    print(json.dumps({"evaluate_s": round(time.time() - t0)}), flush=True)
    with torch.random.fork_rng():
        setup = load_targets("paper_cnn", None, config, torch.device("cpu"))
    x, _ = split_tensors(setup.dataset.test, stratified_subset(setup.dataset.test.labels, n, 0))
    attack = registry_attack("apgd-ce", steps=config.apgd_steps)
    for t in setup.targets:
        flags = result.flags[(t.transform, t.num_members, t.ensemble_eps, "robust", "portfolio",
                              eps, None)]
        idx = flags.nonzero().flatten()[:per_target]
        t1 = time.time()
        r = binarization_test(AggregateView.of(t.module, config.attack_aggregate), x[idx], eps,
                              attack, seed=0)
        print(json.dumps({"target": t.transform, "robust": int(flags.sum()), "tested": len(idx),
                          "valid": r.valid, "failed": r.failed, "invalid": r.invalid,
                          "seconds": round(time.time() - t1, 1)}), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:] + ["100", "0.006", "original,group,ginv,random,shuffle,perm_interp", "10"][
        len(sys.argv[1:]):]
    main(int(args[0]), parse_eps(args[1]), args[2].split(","), int(args[3]))
