"""symensemble.robustness: evaluation, records, threats, sanity and attacks on tiny synthetic models."""

from __future__ import annotations

import math

import pytest
import torch
import torchattacks
from torch import nn

import symensemble as se
from symensemble.data import CIFAR10
from symensemble.robustness import attacks as atk
from symensemble.robustness.evaluation import evaluate, stratified_subset
from symensemble.robustness.records import (
    ORIGINAL,
    WHITEBOX,
    WORST,
    Strength,
    Target,
    parse_eps,
    wilson_interval,
)
from symensemble.robustness.threats import DifferentiableView, get_threat
from tests.conftest import small, synthetic_cifar, tiny_model

NUM_CLASSES = 10
HIDDEN = 4


# ------------------------------------------------------------------------------------------
# tiny synthetic world: class templates + noise, a 2-channel paper CNN trained in a second
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> tuple[nn.Module, CIFAR10]:
    data = synthetic_cifar()
    return tiny_model(data), data


def _transforms() -> list[str]:
    from symensemble.ensembles.ensemble import TRANSFORMS

    return list(TRANSFORMS)


# ------------------------------------------------------------------------------------------
# value helpers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [("8/255", 8 / 255), ("0", 0.0), (0.5, 0.5),
                                             ("1", 1.0), (" 0.012 ", 0.012)])
def test_parse_eps_accepts_numbers_and_fractions(text, expected):
    assert parse_eps(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["1.5", "-0.1", "abc", "1/0", "nan", 2])
def test_parse_eps_rejects_out_of_range_and_garbage(text):
    with pytest.raises(ValueError, match="eps"):
        parse_eps(text)


def test_wilson_interval_known_values_and_edges():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and lo == pytest.approx(0.8389, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for c in range(0, 31, 5):  # the interval always contains the estimate
        lo, hi = wilson_interval(c, 30)
        assert lo <= c / 30 <= hi


def test_stratified_subset_is_balanced_seeded_and_mixed():
    labels = torch.arange(10).repeat_interleave(100)  # ordered by class, like the test folders
    idx = stratified_subset(labels, 100, seed=0)
    assert idx.numel() == 100 and idx.unique().numel() == 100
    assert torch.bincount(labels[idx], minlength=10).tolist() == [10] * 10
    assert torch.equal(idx, stratified_subset(labels, 100, seed=0))
    assert not torch.equal(idx, stratified_subset(labels, 100, seed=1))
    assert labels[idx[:20]].unique().numel() > 3  # batches mix classes
    # unequal classes: proportions kept, remainder to the largest fractional quotas
    labels = torch.cat([torch.zeros(60), torch.ones(30), torch.full((10,), 2)]).long()
    idx = stratified_subset(labels, 15, seed=3)
    # quotas 9, 4.5, 1.5: the tied fractional parts go to the lower class (stable sort)
    assert torch.bincount(labels[idx]).tolist() == [9, 5, 1]
    assert stratified_subset(labels, 100, seed=0).numel() == 100
    with pytest.raises(ValueError, match="between 1 and"):
        stratified_subset(labels, 101, seed=0)
    with pytest.raises(ValueError, match="between 1 and"):
        stratified_subset(labels, 0, seed=0)


def test_strength_clean_and_key():
    assert Strength("fgsm", 0.0, 1).clean and Strength("pgd", 0.3, 0).clean
    assert not Strength("pgd", 0.3, 1, 0.01).clean
    assert Strength("pgd", 0.3, 1, 0.01).key != Strength("pgd", 0.3, 2, 0.01).key


# ------------------------------------------------------------------------------------------
# attack presets
# ------------------------------------------------------------------------------------------


def test_presets_build_the_torchattacks_attacks(world):
    model, _ = world
    expect = {"fgsm": torchattacks.FGSM, "pgd": torchattacks.PGD, "apgd": torchattacks.APGD,
              "eotpgd": torchattacks.EOTPGD, "autoattack": torchattacks.AutoAttack,
              "autoattack-rand": torchattacks.AutoAttack}
    assert sorted(atk.list_attacks("grid")) == sorted(expect)
    for name, cls in expect.items():
        built = atk.get_attack(name, steps=3).build(model, eps=8 / 255, seed=1)
        assert isinstance(built, cls), name
    pgd = atk.get_attack("PGD", steps=4).build(model, eps=0.1)
    assert pgd.alpha == pytest.approx(2.5 * 0.1 / 4) and pgd.steps == 4 and pgd.random_start
    assert atk.get_attack("pgd", steps=4, alpha=0.01).build(model, eps=0.1).alpha == 0.01
    assert atk.default_alpha(8 / 255, 10) == pytest.approx(2 / 255)
    assert atk.get_attack("autoattack-rand").build(model, eps=0.1).version == "rand"
    with pytest.raises(ValueError, match="unknown attack 'cw'"):
        atk.get_attack("cw")


def test_presets_switch_to_eot_on_stochastic_models(world):
    model, _ = world
    fgsm = atk.get_attack("fgsm", eot_iter=5).build(model, eps=0.1, stochastic=True)
    assert isinstance(fgsm, torchattacks.EOTPGD)
    assert (fgsm.steps, fgsm.alpha, fgsm.eot_iter, fgsm.random_start) == (1, 0.1, 5, False)
    pgd = atk.get_attack("pgd", steps=3, eot_iter=4).build(model, eps=0.1, stochastic=True)
    assert isinstance(pgd, torchattacks.EOTPGD) and pgd.eot_iter == 4
    assert atk.get_attack("apgd", eot_iter=6).build(model, eps=0.1, stochastic=True).eot_iter == 6
    assert atk.get_attack("apgd").build(model, eps=0.1).eot_iter == 1
    assert atk.get_attack("autoattack").build(model, eps=0.1, stochastic=True).version == "rand"
    assert atk.get_attack("autoattack").build(model, eps=0.1).version == "standard"


# ------------------------------------------------------------------------------------------
# evaluate(): every attack × threat × transform path
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", ["fgsm", "pgd", "apgd", "eotpgd"])
def test_every_attack_threat_transform_path(world, attack):
    model, data = world
    transforms = [ORIGINAL, *_transforms()]
    result = evaluate(model, data, **small(attack=attack, eps=[0, 0.05], steps=[1],
                                           transforms=transforms))
    ens = [t for t in transforms if t != ORIGINAL]
    # base: one white-box row per strength; each ensemble: transfer, adaptive and worst-case
    assert len(result.records) == 2 * (1 + 3 * len(ens))
    for r in result.records:
        assert 0.0 <= r.ci_low <= r.accuracy <= r.ci_high <= 1.0
        assert r.n == 30 and r.accuracy == pytest.approx(r.correct / 30)
        assert r.attack == attack and r.steps == 1
        assert (r.threat == WHITEBOX) == (r.transform == ORIGINAL)
    for t in ens:
        for threat in ("transfer", "adaptive", WORST):
            assert len(result.select(transform=t, threat=threat)) == 2, (t, threat)
        # on clean images the threat models coincide
        assert result.accuracy(t, "transfer", eps=0.0) == result.accuracy(t, "adaptive", eps=0.0)
        assert result.accuracy(t, WORST, eps=0.0) == result.accuracy(t, "adaptive", eps=0.0)
        # worst case: an image counts only if it survives both threat models
        worst = result.accuracy(t, WORST, eps=0.05)
        assert worst <= min(result.accuracy(t, "transfer", eps=0.05),
                            result.accuracy(t, "adaptive", eps=0.05))
    assert result.accuracy(ORIGINAL, eps=0.05) <= result.accuracy(ORIGINAL, eps=0.0)


def test_autoattack_paths_run(world):
    model, data = world
    result = evaluate(model, data, **small(n=10, attack=["autoattack-rand", "autoattack"],
                                           eps=[0.1], transforms=[ORIGINAL, "group"],
                                           eot_iter=1))
    assert {(r.attack, r.threat) for r in result.records} == {
        (a, t) for a in ("autoattack", "autoattack-rand")
        for t in (WHITEBOX, "transfer", "adaptive", WORST)}
    assert all(r.steps is None for r in result.records)


def test_identity_ensemble_matches_the_base_model(world):
    """Transfer examples are shared: an ensemble of identical members sees what the base sees."""
    model, data = world
    result = evaluate(model, data, **small(attack="fgsm", eps=[0, 0.03, 0.1],
                                           transforms=[ORIGINAL, "identity"],
                                           aggregate="mean"))
    for eps in (0.0, 0.03, 0.1):
        base = result.accuracy(ORIGINAL, eps=eps)
        assert result.accuracy("identity", "transfer", eps=eps) == base
        # log-mean-softmax of identical members is log_softmax(logits): same gradient signs
        assert result.accuracy("identity", "adaptive", eps=eps) == base


def test_stochastic_ensembles_are_attacked_with_eot(world, monkeypatch):
    model, data = world
    calls = []

    class SpyEOT(torchattacks.EOTPGD):
        def __init__(self, *a, **kw):
            calls.append(kw.get("eot_iter"))
            super().__init__(*a, **kw)

    monkeypatch.setattr(torchattacks, "EOTPGD", SpyEOT)
    result = evaluate(model, data, **small(attack="fgsm", eps=[0.05], transforms=["group"],
                                           resample_members=True, eot_iter=3, n=16))
    assert result.settings["stochastic_targets"], "resampled ensembles must report stochastic"
    assert calls and set(calls) == {3}
    calls.clear()
    evaluate(model, data, **small(attack="fgsm", eps=[0.05], transforms=["group"], n=16))
    assert calls == []  # deterministic ensembles: plain FGSM


def test_results_are_reproducible_and_seeded(world):
    model, data = world
    kw = small(attack="pgd", eps=[0.03], steps=[2], transforms=[ORIGINAL, "group"], n=20)
    a = evaluate(model, data, **kw)
    b = evaluate(model, data, **kw)
    assert [r.correct for r in a.records] == [r.correct for r in b.records]
    assert a.settings["subset"]["class_counts"] == [2] * 10


def test_evaluate_restores_the_train_mode_and_the_global_rng(world):
    model, data = world
    try:
        model.train()
        torch.manual_seed(1234)
        before = torch.get_rng_state()
        # apgd reseeds torch itself; the ensemble and the attacks reseed per batch
        evaluate(model, data, **small(attack="apgd", eps=[0.03], steps=[2], n=10,
                                      transforms=[ORIGINAL, "group"]))
        assert model.training, "evaluate() must give the model its train mode back"
        assert torch.equal(torch.get_rng_state(), before), "evaluate() changed the global RNG"

        def broken_factory(*args, **kw):
            raise RuntimeError("factory failed")

        with pytest.raises(RuntimeError, match="factory failed"):
            evaluate(model, data, **small(transforms=[ORIGINAL, "group"], n=10),
                     ensemble_factory=broken_factory)
        assert model.training, "train mode must come back when the run fails too"
        assert torch.equal(torch.get_rng_state(), before)
        model.eval()
        evaluate(model, data, **small(eps=[0.03], n=10, transforms=[ORIGINAL]))
        assert not model.training
    finally:
        model.eval()


def test_calibration_comes_from_the_training_split(world):
    model, data = world
    seen = {}

    def factory(base, calibration, **kw):
        seen["calibration"] = calibration.clone()
        seen["kw"] = kw
        from symensemble.ensembles.ensemble import SymmetryEnsemble

        return SymmetryEnsemble(base, calibration, **kw)

    result = evaluate(model, data, **small(eps=[0.0], transforms=["group"], num_members=2,
                                           calibration_noise=1e-4), ensemble_factory=factory)
    cal = seen["calibration"]
    assert cal.shape == (2 * 2 * HIDDEN, 3, 32, 32)  # G · s, s = 2h by default
    assert seen["kw"]["num_members"] == 2 and seen["kw"]["samples_per_member"] == 2 * HIDDEN
    assert seen["kw"]["calibration_noise"] == 1e-4
    assert result.settings["calibration"]["calibration_noise"] == 1e-4
    def rows_in(rows: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        return (rows.flatten(1)[:, None] == pool.flatten(1)[None]).all(-1).any(-1)

    assert rows_in(cal, data.train.float_images()).all()
    assert not rows_in(cal, data.test.float_images()).any()


def test_calibration_draw_wraps_around_a_small_training_split(world):
    """G·s above the training split: the same permutation continues, each member's own
    s images stay distinct, and a larger s than the split is refused by name."""
    from symensemble.robustness.targets import calibration_images

    _, data = world
    n_train = len(data.train.labels)
    first = calibration_images(data, n_train, seed=3)
    more = calibration_images(data, 2 * n_train + 5, seed=3)
    assert torch.equal(more[:n_train], first) and torch.equal(more[n_train:2 * n_train], first)
    assert torch.equal(more[2 * n_train:], first[:5])
    assert torch.unique(first.flatten(1), dim=0).shape[0] == n_train  # one cycle: all distinct
    cfg = dict(eps=[0.0], transforms=["group"], num_members=n_train, ensemble_eps=0.1)
    result = evaluate(world[0], data, **small(**cfg))  # needs 2h·N images: wraps, still solves
    assert result.settings["calibration"]["count"] == 2 * HIDDEN * n_train
    with pytest.raises(ValueError, match=f"samples_per_member={n_train + 1} .* only {n_train}"):
        evaluate(world[0], data, **small(**cfg, samples_per_member=n_train + 1))


def test_sweeps_build_one_ensemble_per_cell(world):
    model, data = world
    result = evaluate(model, data, **small(eps=[0.0], transforms=["group", "ginv"],
                                           num_members=[2, 3], ensemble_eps=[1.0, 0.01],
                                           threat="transfer"))
    cells = {(r.transform, r.num_members, r.ensemble_eps) for r in result.records
             if r.transform != ORIGINAL}
    assert len(cells) == 2 * 2 * 2
    assert {r.threat for r in result.records} == {WHITEBOX, "transfer"}


def test_iterative_grid_over_steps(world):
    model, data = world
    result = evaluate(model, data, **small(attack="pgd", eps=[0.3], steps=[0, 1, 2],
                                           alpha=0.01, transforms=[ORIGINAL]))
    steps = sorted(r.steps for r in result.records)
    assert steps == [0, 1, 2]
    clean = result.select(steps=0)[0]
    assert clean.alpha is None and result.select(steps=2)[0].alpha == 0.01


def test_bad_arguments_raise_value_errors(world):
    model, data = world
    for kw, match in [(dict(attack="cw"), "unknown attack"),
                      (dict(threat="greybox"), "unknown threat"),
                      (dict(transforms=["original", "bogus"]), "unknown transform"),
                      (dict(aggregate="median"), "unknown aggregate"),
                      (dict(eps=[0.1, 2.0]), "outside"),
                      (dict(n=0), "n must be"),
                      (dict(n=10_000), "between 1 and"),
                      (dict(batch_size=0), "batch_size"),
                      (dict(num_members=0), "num_members"),
                      (dict(ensemble_eps=-1), "ensemble_eps"),
                      (dict(steps=[-1]), "steps")]:
        with pytest.raises(ValueError, match=match):
            evaluate(model, data, **small(**kw))
    with pytest.raises(ValueError, match=".train"):
        evaluate(model, object(), **small())


def test_accuracy_lookup_errors_name_the_filters(world):
    model, data = world
    result = evaluate(model, data, **small(eps=[0, 0.05], transforms=[ORIGINAL]))
    with pytest.raises(KeyError, match="narrow the filters"):
        result.accuracy(ORIGINAL)
    assert 0 <= result.accuracy(ORIGINAL, eps=0.05) <= 1


def test_differentiable_view_restores_the_aggregate(world):
    model, data = world
    from symensemble.ensembles.ensemble import SymmetryEnsemble

    ens = SymmetryEnsemble(model, data.train.float_images()[: 2 * HIDDEN], num_members=2,
                           eps=0.1, aggregate="vote", samples_per_member=HIDDEN)
    view = DifferentiableView(ens)
    x = data.test.float_images()[:4].requires_grad_()
    out = view(x)
    assert ens.aggregate == "vote"
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    src_key, module, stochastic = get_threat("adaptive").source(
        Target(ORIGINAL, model), Target("group", ens, 2, 0.1))
    assert isinstance(module, DifferentiableView) and not stochastic and "group" in src_key
    assert math.isfinite(float(out.detach().sum()))


def test_package_level_evaluate_is_the_function_after_importing_the_modules(world):
    import symensemble.robustness.evaluation
    import symensemble.robustness.records
    import symensemble.robustness.report
    import symensemble.robustness.sanity
    import symensemble.robustness.threats

    model, data = world
    assert se.evaluate is symensemble.robustness.evaluation.evaluate
    assert se.EvaluationResult is symensemble.robustness.records.EvaluationResult
    assert se.load_results is symensemble.robustness.report.load_results
    result = se.evaluate(model, data, **small(eps=[0.0], transforms=[ORIGINAL], n=10))
    assert result.records[0].n == 10


def test_attack_aggregate_selects_the_differentiated_output(world, monkeypatch):
    model, data = world
    seen = []
    real = DifferentiableView.forward

    def spy(self, x):
        seen.append(self.aggregate)
        return real(self, x)

    monkeypatch.setattr(DifferentiableView, "forward", spy)
    kw = small(n=10, eps=[0.05], transforms=["group"], threat="adaptive")
    evaluate(model, data, **kw)
    assert set(seen) == {"mean"}  # vote is counted, mean is attacked
    seen.clear()
    evaluate(model, data, attack_aggregate="logit_mean", **kw)
    assert set(seen) == {"logit_mean"}
    with pytest.raises(ValueError, match="attack_aggregate"):
        evaluate(model, data, attack_aggregate="vote", **kw)


def test_a_plain_module_gets_its_ensembles_through_the_located_head():
    """No SymHead: s defaults to 2C of the head locate_head finds, and from_model builds it."""
    data = synthetic_cifar()
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10)).eval()
    result = evaluate(plain, data, **small(n=10, num_members=2, eps=[0.0], batch_size=10,
                                           transforms=[ORIGINAL, "group"]))
    assert result.settings["calibration"]["samples_per_member"] == 2 * 8
    assert {r.transform for r in result.records} == {ORIGINAL, "group"}
    assert type(se.build_ensemble(plain, data, num_members=2)).__name__ == "SymmetryEnsemble"


def test_an_ensemble_too_large_for_memory_is_refused_before_any_draw(world, monkeypatch):
    model, data = world
    import symensemble.robustness.targets as targets

    def no_draw(*args, **kw):
        raise AssertionError("calibration images drawn before the memory check")

    monkeypatch.setattr(targets, "calibration_images", no_draw)
    with pytest.raises(ValueError, match="memory"):
        evaluate(model, data, **small(num_members=10**7, transforms=[ORIGINAL, "group"]))
