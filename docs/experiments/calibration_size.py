"""Why the group ensemble loses clean accuracy at s = h (issue #12), and what s to default to.

For each checkpoint, group ensembles (G = 200, ε = 10, the evaluation's calibration draw) with
s = h, 2h, 4h calibration images per member, with and without the notebook's 1e-4 noise on H,
plus s = h solved as the notebook solves it (float32 ``torch.linalg.lstsq``, driver gels).
Prints, per setting: clean vote accuracy on test images, the median over members of how often a
member's prediction agrees with the model's, the median relative logit error of a member on
test images, and the median cond(σ(g_k H_k)). One JSON line per (checkpoint, setting).

    python docs/experiments/calibration_size.py paper_cnn checkpoints/paper_cnn_notebook.safetensors
"""

from __future__ import annotations

import json
import sys

import torch

import symensemble as se
from symensemble.robustness.targets import load_dataset, split_tensors, stratified_subset

N = 2000


def _member_stats(ens: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    with torch.no_grad():
        base = ens.base_model(x).double()
        members = torch.cat([ens.member_logits(x[i:i + 500]).double() for i in range(0, len(x), 500)], 1)
        vote = torch.cat([ens(x[i:i + 500], aggregate="vote") for i in range(0, len(x), 500)])
    agree = (members.argmax(-1) == base.argmax(-1)).double().mean(1)  # per member
    rel = ((members - base).norm(dim=-1) / base.norm(dim=-1)).median(1).values
    return {"clean": float((vote.argmax(1) == y).double().mean()),
            "model_clean": float((base.argmax(1) == y).double().mean()),
            "member_agreement_median": float(agree.median()),
            "member_logit_rel_error_median": float(rel.median()),
            "cond_median": None if ens.condition is None else float(ens.condition.median())}


def _notebook_float32_solve(ens: torch.nn.Module) -> torch.nn.Module:
    """Replace W_k = U π_k by the notebook's π: lstsq(σ(gH)ᵀ, σ(H)ᵀ) in float32 (row form)."""
    G, s, h = ens.num_members, ens.samples_per_member, ens.hidden_features
    H = ens.calibration_hidden.float().view(G, s, h)  # rows = images, as the notebook stores them
    act = ens.base_model.head.act
    gH = torch.einsum("kij,ksj->ksi", ens.g.float(), H)  # g_k acting on each image's column
    pi_rows = torch.linalg.lstsq(act(gH), act(H), driver="gels").solution  # (G, h, h): σ(gH) X = σ(H)
    U = ens.base_model.head.U.weight.detach().float()
    ens.W = (U @ pi_rows.transpose(1, 2)).double()  # π = Xᵀ in column convention
    return ens


def run(name: str, data, x: torch.Tensor, y: torch.Tensor) -> None:
    model = se.load_model(name).eval()
    h = model.head.hidden_features
    settings = [(f"s={k}h" + (",noise=1e-4" if noise else ""), k * h, noise)
                for k in (1, 2, 4) for noise in (0.0, 1e-4)]
    for label, s, noise in settings + [("s=1h,noise=1e-4,float32-lstsq", h, 1e-4)]:
        ens = se.build_ensemble(model, data, transform="group", num_members=200, eps=10.0,
                                samples_per_member=s, calibration_noise=noise, seed=0)
        if label.endswith("float32-lstsq"):
            ens = _notebook_float32_solve(ens)
        print(json.dumps({"checkpoint": name, "setting": label, **_member_stats(ens, x, y)}), flush=True)


def main(names: list[str]) -> None:
    data = load_dataset(None)
    idx = stratified_subset(data.test.labels, N, seed=1)
    x, y = split_tensors(data.test, idx)
    for name in names:
        run(name, data, x, y)


if __name__ == "__main__":
    main(sys.argv[1:] or ["paper_cnn"])
