"""Trace Figure 10's perm_interp gap (issue #12): which trained model makes perm_interp lossy?

For each checkpoint: the scale of the head's pre-activations H on test images, how far
σ(H g) g⁻¹ is from σ(H) for the perm_interp g (the member's relative error on the hidden
features), and the clean vote accuracy of perm_interp ensembles over ε and G — fixed members
(one draw, as one notebook forward call over all images sees) and members redrawn on every
forward call. Prints one JSON object per checkpoint.

    python docs/experiments/trace_perm_interp.py paper_cnn_relusqr paper_cnn_notebook_relusqr
"""

from __future__ import annotations

import json
import sys

import torch

import symensemble as se
from symensemble.ensembles.transforms import PermInterpTransform
from symensemble.robustness.targets import load_dataset, split_tensors, stratified_subset

EPS = (20.0, 10.0, 1.0, 0.1)
MEMBERS = (10, 40, 120)
N = 1000


def _vote_accuracy(ens: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    with torch.no_grad():
        pred = torch.cat([ens(x[i:i + batch], aggregate="vote").argmax(1)
                          for i in range(0, len(x), batch)])
    return float((pred == y).double().mean())


def trace(name: str, x: torch.Tensor, y: torch.Tensor) -> dict:
    model = se.load_model(name).eval()
    head = model.head
    with torch.no_grad():
        features = model.embed(x)  # the backbone once; model(x) == head(embed(x))
        H = head.V(features).double()  # (N, h)
        logits = head(features).double()
    base = float((logits.argmax(1) == y).double().mean())
    act = head.act
    out = {"checkpoint": name, "clean": base,
           "H": {"mean": float(H.mean()), "std": float(H.std()), "abs_median": float(H.abs().median()),
                 "positive_fraction": float((H > 0).double().mean())},
           "logit_std": float(logits.std(1).mean()),
           "hidden_relative_error": {}, "vote_accuracy": {}, "vote_accuracy_redrawn": {}}
    gen = torch.Generator().manual_seed(0)
    U = head.U.weight.detach().double()
    for eps in EPS:
        draw = PermInterpTransform(eps).draw(U, act, 64, gen)
        g = draw.g  # (64, h, h), member lower action H ↦ g H (column convention)
        gH = torch.einsum("kij,nj->kni", g, H)
        back = torch.linalg.solve(g.unsqueeze(1), act(gH).unsqueeze(-1)).squeeze(-1)  # g⁻¹ σ(gH)
        err = (back - act(H)).norm(dim=-1) / act(H).norm(dim=-1).clamp_min(1e-30)
        out["hidden_relative_error"][f"{eps:g}"] = float(err.median())
        for G in MEMBERS:
            fixed = se.SymmetryEnsemble(model, None, num_members=G, eps=eps, transform="perm_interp",
                                        seed=0)
            redrawn = se.SymmetryEnsemble(model, None, num_members=G, eps=eps,
                                          transform="perm_interp", seed=0, resample_on_forward=True)
            key = f"eps={eps:g},G={G}"
            out["vote_accuracy"][key] = _vote_accuracy(fixed, x, y, N) - base
            out["vote_accuracy_redrawn"][key] = _vote_accuracy(redrawn, x, y, 100) - base
    return out


def main(names: list[str]) -> None:
    torch.manual_seed(0)
    data = load_dataset(None)
    idx = stratified_subset(data.test.labels, N, seed=0)
    x, y = split_tensors(data.test, idx)
    for name in names:
        print(json.dumps(trace(name, x, y)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["paper_cnn_relusqr", "paper_cnn_notebook_relusqr"])
