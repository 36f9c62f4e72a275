"""How adversarial_CIFAR.ipynb's attacked images differ from FGSM (issue #12, Figure 11).

The notebook stores images as x − 0.5 (range [−0.5, 0.5]) and, for every eps > 0, runs

    x_test = adversary.perturb(x_test, y_test)
    x_test = torch.clamp(adversary.perturb(x_test, y_test), 0, 1)

i.e. two FGSM steps (the second from the first's output: up to 2·eps) and a clamp to [0, 1] in
the shifted range, which sets every pixel darker than mid-grey to mid-grey. This script scores
the single model on FGSM as attacked here (one step, clamp to the valid [0, 1] image range) and
as the notebook attacks it, for the paper's FGSM radii. The notebook's loss is cross-entropy on
its model's softmax output; here the model outputs logits, so the loss is applied to
``softmax(logits)`` as well. Prints JSON.

    python docs/experiments/notebook_fgsm.py checkpoints/paper_cnn_notebook.safetensors paper_cnn
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

import symensemble as se
from symensemble.robustness.targets import load_dataset, split_tensors, stratified_subset

EPS = (0.0, 0.003, 0.006, 0.009, 0.012)


def _fgsm(model, x, y, eps: float, softmax_output: bool) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    out = model(x)
    loss = F.cross_entropy(out.softmax(1) if softmax_output else out, y)
    (grad,) = torch.autograd.grad(loss, x)
    return (x + eps * grad.sign()).detach()


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def run(name: str, x: torch.Tensor, y: torch.Tensor) -> dict:
    model = se.load_model(name).eval()
    out = {"checkpoint": name, "fgsm": {}, "notebook_attack": {}, "clamp_only": {}}
    for eps in EPS:
        out["fgsm"][f"{eps:g}"] = _accuracy(model, _fgsm(model, x, y, eps, False).clamp(0, 1), y)
        if eps == 0:  # the notebook attacks only eps > 0
            continue
        twice = _fgsm(model, _fgsm(model, x, y, eps, True), y, eps, True)
        # clamp(x − 0.5, 0, 1) in the notebook's range is clamp(x, 0.5, 1.5) in [0, 1] units
        out["notebook_attack"][f"{eps:g}"] = _accuracy(model, twice.clamp(0.5, 1.5), y)
    out["clamp_only"] = _accuracy(model, x.clamp(0.5, 1.5), y)  # no perturbation, only the clamp
    return out


def main(names: list[str]) -> None:
    data = load_dataset(None)
    x, y = split_tensors(data.test, stratified_subset(data.test.labels, 1000, seed=0))
    for name in names:
        print(json.dumps(run(name, x, y)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["checkpoints/paper_cnn_notebook.safetensors", "paper_cnn"])
