"""The attack registry: every registered attack runs, stays in the eps ball and [0, 1], is
seeded; our APGD (early stop, memory, known answers) and APGD-T."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import symensemble as se
from symensemble.robustness import attacks as atk
from symensemble.robustness.attacks import apgd_core
from symensemble.robustness.config import EvalConfig
from symensemble.robustness.evaluation import evaluate
from tests.conftest import small, synthetic_cifar, tiny_model

NUM_CLASSES = 5
PIXELS = 12


class Linear(nn.Module):
    """logits = W x[:PIXELS] + b: the exact worst case over an L∞ box is known in closed form."""

    def __init__(self, seed: int = 0, scale: float = 1.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(scale * torch.randn(NUM_CLASSES, PIXELS, generator=gen))
        self.bias = nn.Parameter(torch.zeros(NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :PIXELS] @ self.weight.T + self.bias


def reachable(model: Linear, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, C): class j can beat y somewhere in the box B_eps(x) ∩ [0, 1] (exact, float64)."""
    w, b = model.weight.detach().double(), model.bias.detach().double()
    z = x.flatten(1)[:, :PIXELS].double()
    diff = w[y].unsqueeze(1) - w.unsqueeze(0)  # (B, C, d): w_y − w_j
    worst = torch.where(diff > 0, (z - eps).clamp_min(0).unsqueeze(1),
                        (z + eps).clamp_max(1).unsqueeze(1))
    margin = (diff * worst).sum(-1) + (b[y].unsqueeze(1) - b.unsqueeze(0))
    margin[torch.arange(len(y)), y] = float("inf")
    return margin < 0


@pytest.fixture(scope="module")
def linear_batch():
    model = Linear().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 4, 4, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image correct
    return model, x, y


# ------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------


def test_registry_lists_every_attack_and_refuses_unknown_names_and_options():
    names = se.list_attacks()
    for name in ("fgsm", "pgd", "eotpgd", "apgd", "autoattack", "autoattack-rand",
                 "pgd-transfer", "fgsm-transfer", "apgd-ce", "apgd-dlr", "apgd-softvote",
                 "apgd-t", "apgd-t-softvote", "square", "fgsm-rs", "pgd-train"):
        assert name in names, name
    assert set(atk.list_attacks("grid")) == {"fgsm", "pgd", "eotpgd", "apgd", "autoattack",
                                             "autoattack-rand"}
    with pytest.raises(ValueError, match="unknown attack 'cw'"):
        atk.get_attack("cw")
    with pytest.raises(ValueError, match="has no option"):
        atk.get_attack("fgsm", queries=3)


def test_a_second_attack_with_a_taken_name_is_refused():
    class Dup(atk.Attack):
        name = "pgd"

    with pytest.raises(ValueError, match="already registered"):
        atk.register_attack(Dup)


def test_options_come_from_the_registry_into_config_and_cli():
    options = atk.attack_options()
    for field in ("apgd_steps", "restarts", "transfer_steps", "transfer_restarts",
                  "square_queries", "eot_iter", "cascade", "early_stop"):
        assert field in options, field
        assert getattr(EvalConfig(), field) == options[field].default
    with pytest.raises(ValueError, match="apgd_steps must be an integer >= 1"):
        EvalConfig(apgd_steps=0)
    import click

    @click.command()
    @atk.attack_click_options()
    def cmd(**kw):
        click.echo(repr(sorted(kw.items())))

    from click.testing import CliRunner

    out = CliRunner().invoke(cmd, ["--apgd-steps", "7", "--no-early-stop", "--no-cascade"])
    assert out.exit_code == 0, out.output
    assert "('apgd_steps', 7)" in out.output and "('early_stop', False)" in out.output
    assert "('cascade', False)" in out.output
    assert CliRunner().invoke(cmd, ["--apgd-steps", "0"]).exit_code == 2


def _run(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int):
    attack = atk.get_attack(name, **_fast(name))
    gen = torch.Generator().manual_seed(seed)
    return attack(model, x, y, eps=eps, seed=seed, generator=gen)


def _fast(name: str) -> dict:
    """Small budgets for the registry-wide test."""
    cls = type(atk.get_attack(name))
    opts = cls.options()
    out = {k: 3 for k in ("steps",) if k in opts and name not in ("fgsm", "fgsm-transfer",
                                                                    "fgsm-rs")}
    if "queries" in opts:
        out["queries"] = 20
    if "num_classes" in opts:
        out["num_classes"] = NUM_CLASSES
    return out


@pytest.mark.parametrize("name", atk.list_attacks())
def test_every_registered_attack_respects_eps_and_the_image_box_and_is_seeded(name, linear_batch):
    model, x, y = linear_batch
    x, y, eps = x[:6], y[:6], 0.05
    first = _run(name, model, x, y, eps, seed=3)
    again = _run(name, model, x, y, eps, seed=3)
    assert isinstance(first, list)
    for adv, rep in zip(first, again, strict=True):
        assert adv.shape == x.shape
        assert (adv - x).abs().max() <= eps + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        assert torch.equal(adv, rep), f"{name} is not reproducible under one seed"
    assert model.training is False  # the mode came back


def test_attacks_restore_the_train_mode_and_refuse_bad_inputs(linear_batch):
    model, x, y = linear_batch
    model.train()
    try:
        atk.get_attack("pgd", steps=2)(model, x[:4], y[:4], eps=0.1)
        assert model.training
    finally:
        model.eval()
    with pytest.raises(ValueError, match=r"images must be in \[0, 1\]"):
        atk.get_attack("fgsm")(model, x[:4] * 300, y[:4], eps=0.1)
    with pytest.raises(ValueError, match="eps must be in"):
        atk.get_attack("fgsm")(model, x[:4], y[:4], eps=3)
    with pytest.raises(ValueError, match="labels"):
        atk.get_attack("fgsm")(model, x[:4], y[:3], eps=0.1)


# ------------------------------------------------------------------------------------------
# our APGD
# ------------------------------------------------------------------------------------------


def test_dlr_losses_known_values():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([0])
    # −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3) = −(3 − 1) / (3 − 0)
    assert apgd_core.dlr_loss(z, y).item() == pytest.approx(-2 / 3)
    # targeted at class 3: −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2) = −4 / 3.5
    t = torch.tensor([3])
    assert apgd_core.dlr_targeted_loss(z, y, t).item() == pytest.approx(-4 / 3.5)
    # shift and scale invariant
    assert apgd_core.dlr_loss(7 * z + 2, y).item() == pytest.approx(-2 / 3)
    with pytest.raises(ValueError, match="at least 3 classes"):
        apgd_core._loss("dlr", z[:, :2], y, None)


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_finds_the_exact_robust_accuracy_of_a_linear_model(loss, linear_batch):
    model, x, y = linear_batch
    eps = 0.06
    breakable = reachable(model, x, y, eps).any(1)
    assert 0.2 < breakable.double().mean() < 0.9
    gen = torch.Generator().manual_seed(0)
    adv, broken = apgd_core.apgd(model, x, y, eps=eps, steps=50, loss=loss, generator=gen)
    assert not (broken & ~breakable).any()  # sound: nothing unbreakable is broken
    # and complete on a linear model: exactly with the DLR margin, nearly with the CE (the
    # cross-entropy gradient mixes every wrong class, so it can aim between two of them)
    assert int((breakable & ~broken).sum()) <= (0 if loss == "dlr" else int(breakable.sum()) // 10)
    with torch.no_grad():
        assert torch.equal(model(adv).argmax(1) != y, broken)


def test_apgd_t_reaches_a_target_class_where_one_is_reachable(linear_batch):
    model, x, y = linear_batch
    eps = 0.05
    breakable = reachable(model, x, y, eps).any(1)
    [adv] = atk.get_attack("apgd-t", steps=30)(model, x, y, eps=eps, seed=0)
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    assert torch.equal(fooled, breakable)
    assert (adv - x).abs().max() <= eps + 1e-6
    with pytest.raises(ValueError, match="at least 4 classes"):
        three = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
        atk.get_attack("apgd-t", steps=2)(three, x[:2], torch.zeros(2, dtype=torch.long), eps=0.1)


def test_early_stop_gives_the_same_points_and_stops_working_on_broken_images(linear_batch):
    model, x, y = linear_batch
    calls: list[int] = []

    def counting(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return model(images).argmax(1)

    out = {}
    for stop in (True, False):
        calls.clear()
        gen = torch.Generator().manual_seed(0)
        out[stop] = apgd_core.apgd(model, x, y, eps=0.06, steps=40, loss="dlr", generator=gen,
                                   judge=counting, early_stop=stop)
        out[(stop, "work")] = sum(calls)
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    assert out[(False, "work")] == 41 * len(y)  # initial point + every step on every image
    assert out[(True, "work")] < out[(False, "work")] / 2


def test_apgd_state_does_not_grow_with_the_step_count(linear_batch):
    model, x, y = linear_batch
    sizes = []
    original = apgd_core._checkpoint

    def spy(state, window, rho):
        sizes.append(sum(v.numel() for v in vars(state).values()))
        return original(state, window, rho)

    apgd_core._checkpoint = spy
    try:
        for steps in (10, 400):
            apgd_core.apgd(model, x, y, eps=0.01, steps=steps, generator=torch.Generator(),
                           early_stop=False)
    finally:
        apgd_core._checkpoint = original
    assert len(set(sizes)) == 1  # the same tensors whatever the number of steps


@pytest.fixture(scope="module")
def world():
    data = synthetic_cifar()
    return tiny_model(data), data


def test_early_stop_gives_identical_records_and_flags(world):
    model, data = world
    kw = small(n=40, eps=[0.03], transforms=["original", "group"], batch_size=20, apgd_steps=20)
    on = evaluate(model, data, early_stop=True, **kw)
    off = evaluate(model, data, early_stop=False, **kw)
    assert on.records == off.records
    assert on.flags.keys() == off.flags.keys()
    assert all(torch.equal(on.flags[k], off.flags[k]) for k in on.flags)
    assert on.settings["early_stop"] is True and off.settings["early_stop"] is False
