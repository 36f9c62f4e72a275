"""Unit tests of the evaluation's middle layers: EvalConfig validation, plan() and the runner."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from symensemble.distributed import DistInfo
from symensemble.robustness.attacks import PORTFOLIO, attack_options
from symensemble.robustness.config import EvalConfig
from symensemble.robustness.plan import Kind, Role, plan
from symensemble.robustness.records import Strength, Target
from symensemble.robustness.runner import Runner, derive_seed, run
from symensemble.vocab import CLEAN, ORIGINAL, ROBUST, WHITEBOX


class Fixed(nn.Module):
    """A 'model' that predicts class (first pixel > 0.5): attackable, no weights to train."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x.flatten(1)[:, :1]
        return torch.cat([0.5 - p, p - 0.5, torch.zeros_like(p), torch.zeros_like(p)], 1) * 10


class FakeEnsemble(Fixed):
    """Has an ``aggregate`` (so it is treated as an ensemble) and accepts ``aggregate=``."""

    aggregate = "vote"

    def forward(self, x: torch.Tensor, aggregate: str | None = None) -> torch.Tensor:
        return super().forward(x)


def _targets() -> list[Target]:
    return [Target(ORIGINAL, Fixed()), Target("group", FakeEnsemble(), 3, 0.1)]


# ------------------------------------------------------------------------------------------
# EvalConfig
# ------------------------------------------------------------------------------------------


def test_autoattack_config_survives_a_copy_and_refuses_a_user_grid():
    c = EvalConfig(protocol="autoattack")
    assert c.attack == ("autoattack",) and c.threat == ("adaptive",)
    again = c.replace(n=5)  # evaluate(config=...) re-validates a copy: the bug of issue 19
    assert again.n == 5 and again.attack == ("autoattack",) and again.protocol == "autoattack"
    with pytest.raises(ValueError, match="only apply to protocol 'paper'"):
        EvalConfig(protocol="autoattack", attack="pgd")
    with pytest.raises(ValueError, match="only apply to protocol 'paper'"):
        EvalConfig(protocol="portfolio", threat="transfer")


@pytest.mark.parametrize("kw, message", [
    (dict(protocol="nope"), "unknown protocol"),
    (dict(n=0), "n must be an integer >= 1"),
    (dict(eps="2"), "outside"),
    (dict(attack="apgd-ce"), "cannot run in the paper grid"),
    (dict(attack="cw"), "unknown attack 'cw'"),
    (dict(threat="magic"), "unknown threat model 'magic'"),
    (dict(apgd_steps=0), "apgd_steps must be an integer >= 1"),
    (dict(square_queries=-1), "square_queries must be an integer >= 0"),
    (dict(restarts=True), "restarts must be an integer"),
    (dict(early_stop="yes"), "early_stop must be true or false"),
    (dict(aggregate="max"), "unknown aggregate"),
    (dict(attack_aggregate="vote"), "attack_aggregate must be"),
    (dict(calibration_noise=float("nan")), "calibration_noise"),
    (dict(num_members=[0]), "num_members must be integers >= 1"),
])
def test_config_errors_name_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**kw)


def test_config_attack_fields_come_from_the_registry_and_round_trip():
    c = EvalConfig(apgd_steps=7, early_stop=False, cascade=False)
    assert set(attack_options()) <= set(c.to_dict())
    assert (c.apgd_steps, c.early_stop, c.cascade) == (7, False, False)
    back = EvalConfig.from_mapping(c.to_dict())
    assert back == c
    with pytest.raises(ValueError, match="unknown keys"):
        EvalConfig.from_mapping({"apgd_stepz": 3})


# ------------------------------------------------------------------------------------------
# plan()
# ------------------------------------------------------------------------------------------


def test_portfolio_plan_has_one_unit_per_radius_and_the_probes():
    targets = _targets()
    units = plan(EvalConfig(eps=[0, 0.01, 0.02]), targets)
    records = [u for u in units if u.role is Role.RECORD]
    assert [u.strength.eps for u in records] == [0.0, 0.01, 0.02]
    assert all(u.kind is Kind.PORTFOLIO for u in records)
    assert [m.label for m in records[0].measures] == [ROBUST, ROBUST]  # clean: one row each
    names = [a.name for a in records[1].components]
    assert names == [n for n in PORTFOLIO if n != "square"]  # no Square without a budget
    labels = [m.label for m in records[1].measures]
    assert labels == [CLEAN, *names] * 2
    probes = [u for u in units if u.role is Role.PROBE]
    assert len(probes) == 1 and probes[0].kind is Kind.GRID  # the large-eps PGD probe
    with_square = plan(EvalConfig(eps=[0.01], square_queries=5, sanity=False), targets)
    assert [a.name for a in with_square[0].components][-1] == "square"
    # no clean radius: a clean probe is added for the sanity checks
    assert any(u.note == "clean accuracy" for u in plan(EvalConfig(eps=[0.01]), targets))


def test_paper_plan_is_the_grid_with_its_references():
    targets = _targets()
    units = plan(EvalConfig(attack="pgd", eps=[0, 0.01], steps=[1, 3]), targets)
    records = [u for u in units if u.role is Role.RECORD]
    assert [(u.strength.eps, u.strength.steps) for u in records] == [
        (0.0, 1), (0.0, 3), (0.01, 1), (0.01, 3)]
    assert records[2].strength.alpha == pytest.approx(2.5 * 0.01 / 1)
    assert [(m.label, m.target.transform) for m in records[0].measures] == [
        (WHITEBOX, ORIGINAL), ("transfer", "group"), ("adaptive", "group")]
    probes = [u for u in units if u.role is Role.PROBE]
    assert {u.strength.attack for u in probes} == {"pgd", "fgsm"}  # large eps, FGSM reference
    aa = plan(EvalConfig(protocol="autoattack", sanity=False), targets)
    assert [u.strength.attack for u in aa] == ["autoattack", "autoattack"]


# ------------------------------------------------------------------------------------------
# the runner
# ------------------------------------------------------------------------------------------


def test_derive_seed_is_stable_and_separates_its_parts():
    assert derive_seed(0, "a", 1) == derive_seed(0, "a", 1)
    assert len({derive_seed(0, "a", 1), derive_seed(1, "a", 1), derive_seed(0, "a", 2),
                derive_seed(0, "a1")}) == 4
    assert 0 <= derive_seed(2**40, "x") < 2**63


def test_run_places_every_batch_and_shards_round_robin(monkeypatch):
    class Stub:
        config = SimpleNamespace(batch_size=3)
        calls: list[int] = []

        def run_batch(self, unit, x, y, batch_index):
            self.calls.append(batch_index)
            return torch.stack([y == batch_index, y >= 0])

    unit = SimpleNamespace(measures=[1, 2], strength=Strength("fgsm", 0.1, 1))
    y = torch.arange(8) // 3  # each image's label is its batch index
    x = torch.zeros(8, 1)
    stub = Stub()
    flags, seconds = run([unit], stub, x, y, DistInfo(), torch.device("cpu"))
    assert flags[0].shape == (2, 8) and flags[0].all() and len(seconds) == 1
    stub.calls.clear()
    # the other rank's share would arrive through the all-reduce; here there is no group
    monkeypatch.setattr("symensemble.robustness.runner.all_reduce_sum", lambda t, info, dev: t)
    flags, _ = run([unit], stub, x, y, DistInfo(rank=1, world_size=2), torch.device("cpu"))
    assert stub.calls == [1]  # rank 1 of 2: the second of three batches only
    assert flags[0][0].tolist() == [False] * 3 + [True] * 3 + [False] * 2  # no reduction here


def test_runner_portfolio_rows_are_nested_and_clean_first():
    targets = _targets()
    config = EvalConfig(eps=[0.3], sanity=False, apgd_steps=5, transfer_steps=3)
    [unit] = plan(config, targets)
    x = torch.rand(12, 1, 2, 2)
    y = (x.flatten(1)[:, 0] > 0.5).long()
    flags = Runner(targets[0], config, num_classes=4).run_batch(unit, x, y, 0)
    assert flags.shape == (len(unit.measures), 12)
    for t in range(2):  # per target: clean, then each attack's survivors, nested
        rows = flags[t * (len(unit.components) + 1):(t + 1) * (len(unit.components) + 1)]
        assert rows[0].all()  # the toy model is always right on clean images
        for before, after in zip(rows[:-1], rows[1:], strict=True):
            assert not (after & ~before).any()
        # eps 0.3 moves any pixel within 0.3 of 0.5 across the boundary: exactly those fall
        near = (x.flatten(1)[:, 0] - 0.5).abs() < 0.3
        assert torch.equal(rows[-1], ~near)
