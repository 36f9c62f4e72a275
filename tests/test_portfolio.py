"""The robust-accuracy portfolio: known answers on toy models, cascade bookkeeping, config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import symensemble as se
from symensemble.data import CIFAR10, Split
from symensemble.robustness.attacks import SoftVote
from symensemble.robustness.config import EvalConfig
from symensemble.robustness.evaluation import evaluate
from symensemble.robustness.records import ORIGINAL
from symensemble.robustness.runner import Runner
from symensemble.robustness.sanity import portfolio_checks
from tests.conftest import small, synthetic_cifar, tiny_model

NUM_CLASSES = 4
PIXELS = 24  # the toy linear model reads only these pixels, so exact margins stay moderate


# ------------------------------------------------------------------------------------------
# a linear classifier behind a saturating, scale-blown output (gradient masking by design)
# ------------------------------------------------------------------------------------------


class BlownLinear(nn.Module):
    """logits = scale · (W x + b) on the first ``PIXELS`` pixels; scale saturates the softmax.

    With scale 1e6 the float32 softmax of a correctly classified image is exactly one-hot, so
    the cross-entropy gradient is exactly zero: FGSM does not move the image at all.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, scale: float = 1e6) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x.flatten(1)[:, :PIXELS] @ self.weight.T + self.bias)


def exact_robust(model: BlownLinear, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Per image: correct at every point of the L∞ ball ∩ [0, 1]^d (exact for a linear model).

    For each wrong class j the margin (w_y − w_j)·x' + (b_y − b_j) is minimized coordinatewise
    over the box: x'_i = max(x_i − eps, 0) where w_y − w_j > 0, else min(x_i + eps, 1).
    """
    w = model.weight.detach().double()
    b = model.bias.detach().double()
    z = x.flatten(1)[:, :PIXELS].double()
    diff = w[y].unsqueeze(1) - w.unsqueeze(0)  # (B, C, d): w_y − w_j
    low = (z - eps).clamp_min(0).unsqueeze(1)
    high = (z + eps).clamp_max(1).unsqueeze(1)
    worst = torch.where(diff > 0, low, high)
    margin = (diff * worst).sum(-1) + (b[y].unsqueeze(1) - b.unsqueeze(0))  # (B, C)
    margin[torch.arange(len(y)), y] = float("inf")
    return (margin > 0).all(dim=1)


@pytest.fixture(scope="module")
def blown_world() -> tuple[BlownLinear, CIFAR10, float]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(NUM_CLASSES, PIXELS, generator=gen)
    model = BlownLinear(weight, torch.zeros(NUM_CLASSES)).eval()

    def split(n: int) -> Split:
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
        with torch.no_grad():
            labels = model(images.float() / 255).argmax(1)  # clean accuracy 1 by construction
        return Split(images, labels)

    data = CIFAR10(split(40), split(8), split(80), tuple(f"c{i}" for i in range(NUM_CLASSES)),
                   "synthetic-linear")
    return model, data, 0.08


def test_portfolio_finds_the_exact_robust_accuracy_that_fgsm_misses(blown_world):
    model, data, eps = blown_world
    x = data.test.images.float() / 255
    y = data.test.labels
    truth = exact_robust(model, x, y, eps).double().mean().item()
    assert 0.2 < truth < 0.8, "the toy problem must leave room above and below"

    fgsm = evaluate(model, data, n=80, protocol="paper", attack="fgsm", eps=[eps],
                    transforms=[ORIGINAL], sanity=False, batch_size=40)
    assert fgsm.accuracy(ORIGINAL, eps=eps) == 1.0  # saturated softmax: FGSM sees no gradient

    result = evaluate(model, data, n=80, eps=[eps], transforms=[ORIGINAL], sanity=False,
                      batch_size=40, apgd_steps=50)
    robust = result.accuracy(ORIGINAL, eps=eps)
    # sound (never below the exact value: every candidate lies in the ball) and tight
    assert truth - 1e-9 <= robust <= truth + 0.025, (robust, truth)
    # per image: nothing the exact analysis calls robust was broken
    flags = result.flags[(ORIGINAL, None, None, "robust", "portfolio", eps, None)]
    order = se.stratified_subset(data.test.labels, 80, 0)
    assert not (flags & ~exact_robust(model, x[order], y[order], eps)).any()
    broke = {r.threat: r.broken for r in result.records if r.eps == eps and r.broken is not None}
    # the saturated cross-entropy finds next to nothing; the scale-free losses find the rest
    assert broke["apgd-dlr"] + broke["apgd-softvote"] > 5 * broke["apgd-ce"]


def test_undefended_model_portfolio_is_never_above_pgd():
    data = synthetic_cifar()
    model = tiny_model(data)
    kw = small(n=40, eps=[0.03], transforms=[ORIGINAL, "group"], batch_size=20)
    pgd = evaluate(model, data, protocol="paper", attack="pgd", steps=[10], threat="adaptive", **kw)
    port = evaluate(model, data, apgd_steps=20, **kw)
    for t in (ORIGINAL, "group"):
        threat = None if t == ORIGINAL else "adaptive"
        assert port.accuracy(t, eps=0.03) <= pgd.accuracy(t, threat, eps=0.03)
        robust = port.flags[next(k for k in port.flags if k[0] == t and k[3] == "robust")]
        clean = port.flags[next(k for k in port.flags if k[0] == t and k[3] == "clean")]
        assert not (robust & ~clean).any()  # robust images are clean-correct images


@pytest.mark.parametrize("cascade", [True, False])
def test_cascade_attacks_only_still_robust_images(monkeypatch, cascade):
    data = synthetic_cifar()
    model = tiny_model(data)
    seen: dict[tuple[str, str], int] = {}
    original = Runner._survives

    def spy(self, comp, target, x, y, idx, *args, **kw):
        key = (comp.name, target.key)
        seen[key] = seen.get(key, 0) + idx.numel()
        return original(self, comp, target, x, y, idx, *args, **kw)

    monkeypatch.setattr(Runner, "_survives", spy)
    result = evaluate(model, data, **small(n=40, eps=[0.05], transforms=[ORIGINAL, "group"],
                                           batch_size=20), apgd_steps=10, cascade=cascade)
    for t in (ORIGINAL, "group"):
        rows = [r for r in result.records if r.transform == t and r.eps == 0.05]
        clean = rows[0]
        assert clean.threat == "clean"
        left = clean.correct
        for r in rows[1:-1]:
            key = (r.threat, "original" if t == ORIGINAL else f"{t}|G=3|eps=0.1")
            # each attack tried exactly the images every earlier one left robust (cascade),
            # or every clean-correct image (no cascade)
            assert seen.get(key, 0) == (left if cascade else clean.correct), (r.threat, t)
            left -= r.broken
        assert rows[-1].threat == "robust" and rows[-1].correct == left


def test_cascade_and_standalone_agree_on_the_robust_row():
    data = synthetic_cifar()
    model = tiny_model(data)
    kw = dict(**small(n=30, eps=[0.05], transforms=[ORIGINAL], batch_size=30), apgd_steps=10)
    a = evaluate(model, data, cascade=True, **kw)
    b = evaluate(model, data, cascade=False, **kw)
    # same seeds per image batch: the AND over attacks is the same set either way, up to the
    # attacks' dependence on which images share a batch; it can only be lower without cascade
    assert b.accuracy(ORIGINAL, eps=0.05) <= a.accuracy(ORIGINAL, eps=0.05) + 0.1


# ------------------------------------------------------------------------------------------
# the soft-vote surrogate
# ------------------------------------------------------------------------------------------


class Members(nn.Module):
    """An 'ensemble' with fixed member logits of wildly different scales."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits  # (G, B, C) template, scaled by the input

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits * x.flatten(1).mean(1).view(1, -1, 1)


def test_soft_vote_keeps_each_members_vote_and_stays_finite():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, 10, generator=gen, dtype=torch.float64)
    logits[:3] *= 1e10  # wild members, as calibrated ensembles at large eps have
    x = torch.full((5, 3, 4, 4), 0.5, dtype=torch.float64, requires_grad=True)
    out = SoftVote(Members(logits))(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.exp().sum(1), torch.ones(5, dtype=torch.float64))
    votes = torch.nn.functional.one_hot(logits.argmax(-1), 10).double().mean(0)
    # a class no member votes for has lower soft-vote probability than the vote winner
    assert (out.argmax(1) == votes.argmax(1)).double().mean() >= 0.6
    out[:, 0].sum().backward()
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------


def test_eval_config_resolves_protocol_defaults():
    c = EvalConfig()
    assert c.protocol == "portfolio" and c.n == 500 and c.attack is None
    assert c.eps == (0.0, 0.006, 0.012, 8 / 255)
    p = EvalConfig(attack="pgd", steps=[5, 10])
    assert p.protocol == "paper" and p.attack == ("pgd",) and p.steps == (5, 10)
    assert p.threat == ("transfer", "adaptive") and p.n == 1000
    a = EvalConfig(protocol="autoattack")
    assert a.attack == ("autoattack",) and a.eps == (0.0, 8 / 255)
    assert EvalConfig(eps="0,8/255").eps == (0.0, 8 / 255)
    assert EvalConfig.from_mapping(c.to_dict()) == c


@pytest.mark.parametrize("kw, message", [
    (dict(protocol="portfolio", attack="pgd"), "only apply to protocol 'paper'"),
    (dict(protocol="nope"), "unknown protocol"),
    (dict(n=0), "n must be an integer >= 1"),
    (dict(eps=[1.5]), "outside"),
    (dict(apgd_steps=0), "apgd_steps"),
    (dict(aggregate="max"), "unknown aggregate"),
    (dict(attack_aggregate="vote"), "differentiable"),
    (dict(num_members=[0]), "num_members"),
    (dict(ensemble_eps=[-1]), "ensemble_eps"),
    (dict(protocol="paper", attack="cw"), "unknown attack"),
    (dict(calibration_noise=-1e-4), "calibration_noise must be a finite number >= 0"),
    (dict(calibration_noise=float("nan")), "calibration_noise must be a finite number >= 0"),
])
def test_eval_config_rejects_bad_values(kw, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**kw)


def test_evaluate_rejects_unknown_keywords():
    with pytest.raises(ValueError, match="unexpected keyword"):
        evaluate(nn.Linear(1, 1), None, n_images=3)


def test_portfolio_checks_flag_masking_and_non_convergence():
    from symensemble.robustness.records import Record

    def row(threat, correct, broken=None):
        return Record("group", threat, "portfolio", 0.03, None, correct / 500, 0, 1, 500,
                      correct, 200, 10.0, None, broken)

    healthy = [row("clean", 300), row("pgd-transfer", 150, 150), row("fgsm-transfer", 150, 0),
               row("apgd-ce", 100, 50), row("apgd-dlr", 98, 2), row("apgd-softvote", 97, 1),
               row("robust", 97)]
    assert portfolio_checks(healthy) == []
    masked = healthy[:6] + [row("square", 40, 57), row("robust", 40)]
    assert any(w.startswith("[square-beats-gradients]") for w in portfolio_checks(masked))
    assert portfolio_checks(healthy[:6] + [row("square", 96, 1), row("robust", 96)]) == []
    slow = healthy[:5] + [row("apgd-softvote", 60, 38), row("robust", 60)]
    assert any(w.startswith("[not-converged]") for w in portfolio_checks(slow))


# ------------------------------------------------------------------------------------------
# the ensemble the CLI evaluates, built from Python
# ------------------------------------------------------------------------------------------


def test_build_ensemble_is_the_ensemble_evaluate_scores():
    data = synthetic_cifar()
    model = tiny_model(data)
    result = evaluate(model, data, **small(n=30, eps=[0.0], transforms=[ORIGINAL, "group"]))
    ens = se.build_ensemble(model, data, transform="group", num_members=3, eps=0.1, seed=0)
    idx = se.stratified_subset(data.test.labels, 30, 0)
    x = data.test.images[idx].float() / 255
    with torch.no_grad():
        acc = (ens(x).argmax(1) == data.test.labels[idx]).double().mean().item()
    assert acc == pytest.approx(result.accuracy("group", eps=0.0))
    assert ens.aggregate == "vote" and ens.num_members == 3
