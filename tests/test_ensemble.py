"""SymmetryEnsemble: member exactness, aggregates, gradients, chunking, transforms, errors."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import symensemble
from symensemble.ensembles.ensemble import TRANSFORMS, HeadParts, SymmetryEnsemble
from symensemble.models import SymHead, SymModel, create_model, list_models

H_DIM, C_DIM = 6, 4


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(SymModel):
    """A small SymModel on (B, 3, 4, 4) images: flatten → Linear → tanh → SymHead."""

    def __init__(self, act: str = "leaky_relu", hidden: int = H_DIM, dtype=torch.float32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(48, 10)
        self.head = SymHead(10, hidden, C_DIM, act)
        self.to(dtype).eval()

    def embed(self, x):
        return torch.tanh(self.body(x.flatten(1)))


class UserNet(nn.Module):
    """A user's own network: features → fc1 → act → fc2 (no SymHead)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(48, 12), nn.Tanh())
        self.fc1 = nn.Linear(12, H_DIM)
        self.act = nn.LeakyReLU(0.2)
        self.fc2 = nn.Linear(H_DIM, C_DIM)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.features(x))))


def images(n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def ensemble(model=None, n_members=5, **kw) -> SymmetryEnsemble:
    model = TinyNet() if model is None else model
    # the paper's s = h (members exact on their calibration images) unless a test says otherwise
    s = kw.setdefault("samples_per_member", model.head.hidden_features)
    kw.setdefault("eps", 2.0)
    return SymmetryEnsemble(model, images(n_members * s, seed=1), num_members=n_members, **kw)


def own_block_logits(ens: SymmetryEnsemble, cal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Member k's logits on its own calibration images, and the model's."""
    G, s = ens.num_members, ens.samples_per_member
    with torch.no_grad():
        all_logits = ens.member_logits(cal[: G * s])  # (G, G·s, C)
        base = ens.base_model(cal[: G * s]).view(G, s, -1)
    own = all_logits.view(G, G, s, -1)[torch.arange(G), torch.arange(G)]
    return own, base


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["leaky_relu", "tanh", "sigmoid", "radial", "relu_sqr"])
@pytest.mark.parametrize("s", [H_DIM, 3])  # exact for s ≤ h (the paper: s = h)
def test_group_members_reproduce_calibration_logits_float32(act, s):
    model = TinyNet(act)
    ens = ensemble(model, n_members=8, samples_per_member=s, eps=2.0)
    own, base = own_block_logits(ens, images(8 * ens.samples_per_member, seed=1))
    assert own.dtype == torch.float32
    assert (own - base).abs().max() <= 1e-4
    # ...while members differ from the model elsewhere.
    with torch.no_grad():
        other = ens.member_logits(images(20, seed=5))
        assert (other - model(images(20, seed=5))).abs().max() > 1e-2


def test_group_members_exact_at_large_eps_when_well_conditioned():
    ens = ensemble(n_members=30, eps=10.0)
    own, base = own_block_logits(ens, images(30 * H_DIM, seed=1))
    err = (own - base).abs().amax((1, 2))
    cond = ens.condition.cpu()
    assert cond.shape == (30,)
    ok = cond <= 1e11
    assert ok.sum() >= 20
    assert err[ok].max() <= 1e-4
    # Beyond that, the error follows cond·eps(float64)·|logits|.
    assert (err <= 1e-4 + cond * 1e-14).all()


def test_default_samples_per_member_is_a_least_squares_fit_over_2h_images():
    """Default s = 2h: π is the least-squares solution of π σ(g H_k) ≈ σ(H_k), so the residual
    is orthogonal to σ(g H_k)'s rows (normal equations), and the members no longer interpolate."""
    from symensemble.ensembles.ensemble import DEFAULT_SAMPLES_PER_HIDDEN, default_samples_per_member

    assert DEFAULT_SAMPLES_PER_HIDDEN == 2 and default_samples_per_member(H_DIM) == 2 * H_DIM
    model = TinyNet("tanh", dtype=torch.float64)
    cal = images(4 * 2 * H_DIM, seed=1, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"needs at least {4 * 2 * H_DIM} calibration images"):
        SymmetryEnsemble(model, cal[:-1], 4, eps=1.0)
    ens = SymmetryEnsemble(model, cal, 4, eps=1.0)
    assert ens.samples_per_member == 2 * H_DIM
    Ht = ens.calibration_hidden.view(4, 2 * H_DIM, H_DIM).transpose(1, 2)  # (G, h, 2h)
    act, U = model.head.act, model.head.U.weight.detach()
    A = act(ens.g @ Ht)  # σ(g H_k), (G, h, 2h)
    residual = ens.W @ A - U @ act(Ht)  # (G, C, 2h)
    assert residual.abs().max() > 1e-6  # not interpolating 2h images with h unknowns per row
    normal = residual @ A.transpose(1, 2)  # (W − Uπ*) A Aᵀ = 0 at the least-squares optimum
    assert normal.abs().max() <= 1e-8 * (U @ act(Ht) @ A.transpose(1, 2)).abs().max()


def test_calibration_noise_solves_pi_on_the_noisy_pre_activations():
    """The notebook's store_batch: H_k ← H_k + noise·N(0, 1) before π(g, H_k) is solved."""
    model = TinyNet("relu_sqr")
    clean = ensemble(model, n_members=6, eps=1.0)
    noisy = ensemble(model, n_members=6, eps=1.0, calibration_noise=1e-3)
    assert torch.equal(noisy.g, clean.g)  # the noise has its own stream: same members' g
    diff = noisy.calibration_hidden - clean.calibration_hidden
    assert 0.8e-3 < float(diff.std()) < 1.2e-3 and abs(float(diff.mean())) < 3e-4
    assert not torch.allclose(noisy.W, clean.W)
    # defining property on the noisy H̃_k: W_k σ(g_k H̃_k) = U σ(H̃_k), to float64 rounding
    G, s, h = 6, noisy.samples_per_member, H_DIM
    Ht = noisy.calibration_hidden.double().view(G, s, h).transpose(1, 2)  # (G, h, s)
    act, U = model.head.act, model.head.U.weight.detach().double()
    member = noisy.W @ act(noisy.g @ Ht)
    assert (member - U @ act(Ht)).abs().max() <= 1e-9 * (U @ act(Ht)).abs().max()
    again = ensemble(model, n_members=6, eps=1.0, calibration_noise=1e-3)
    assert torch.equal(again.W, noisy.W)  # seeded
    assert "calibration_noise=0.001" in repr(noisy) and "calibration_noise" not in repr(clean)
    for bad in (-1e-4, math.nan, math.inf, "1e-4", True):
        with pytest.raises(ValueError, match="calibration_noise must be a finite number >= 0"):
            ensemble(model, n_members=2, calibration_noise=bad)


def test_identity_reproduces_model_exactly():
    model = TinyNet()
    ens = ensemble(model, transform="identity")
    x = images(11, seed=3)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(ens.member_logits(x), ref.expand(ens.num_members, -1, -1))
        assert torch.equal(ens(x, aggregate="logit_mean"), ref)
        assert torch.equal(ens(x, aggregate="mean"), torch.log_softmax(ref, -1))
        assert torch.equal(ens(x, aggregate="vote").argmax(1), ref.argmax(1))


def test_identity_activation_makes_group_and_ginv_exact_everywhere():
    """For σ = identity both the π action (s = h) and (U g⁻¹, gV) are symmetries of the head."""
    model = TinyNet("identity", dtype=torch.float64)
    x = images(9, seed=4, dtype=torch.float64)
    for transform in ("group", "ginv"):
        ens = SymmetryEnsemble(
            model, images(5 * H_DIM, seed=1, dtype=torch.float64), 5, eps=1.0, transform=transform,
            samples_per_member=H_DIM,
        )
        with torch.no_grad():
            torch.testing.assert_close(ens.member_logits(x), model(x).expand(5, -1, -1))


# ---------------------------------------------------------------------------------------------
# Aggregates, gradients, chunking
# ---------------------------------------------------------------------------------------------


def test_aggregates_agree_with_member_logits():
    ens = ensemble(n_members=7, eps=3.0)
    x = images(13, seed=6)
    with torch.no_grad():
        L = ens.member_logits(x).double()
        assert L.shape == (7, 13, C_DIM)
        mean = ens(x, aggregate="mean")
        torch.testing.assert_close(mean.double(), L.softmax(-1).mean(0).log(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ens(x, aggregate="logit_mean").double(), L.mean(0), atol=1e-5, rtol=1e-5)
        vote = ens(x, aggregate="vote")
        assert vote.shape == (13, C_DIM)
        torch.testing.assert_close(vote.sum(1), torch.ones(13))
        assert torch.equal(vote.argmax(1), torch.mode(L.argmax(-1), 0).values)
        scaled = L / L.std(-1, keepdim=True)  # the soft vote: mean of scale-free softmaxes
        soft = ens(x, aggregate="soft_vote").double()
        torch.testing.assert_close(soft, scaled.softmax(-1).mean(0).log(), atol=1e-5, rtol=1e-5)
        assert torch.equal(ens(x), vote)  # the default output is the vote
    xg = x.clone().requires_grad_(True)
    st = ens(xg)
    assert st.requires_grad and torch.equal(st.detach(), vote)  # same value with a graph
    with pytest.raises(ValueError, match="unknown aggregate"):
        ens(x, aggregate="median")
    with pytest.raises(ValueError, match="unknown aggregate"):
        ensemble(n_members=2, aggregate="median")
    with pytest.raises(AttributeError):  # no public setter: the shared module is never mutated
        ens.aggregate = "vote"


def test_mean_aggregate_stays_finite_when_probabilities_underflow():
    ens = ensemble(n_members=4, eps=1.0)
    ens.W.mul_(1e6)  # members with enormous logits: softmax probabilities underflow to 0
    x = images(5, seed=7).requires_grad_(True)
    out = ens(x, aggregate="mean")
    assert torch.isfinite(out).all()
    with torch.no_grad():
        L = ens.member_logits(x).double()
        assert (L.softmax(-1).mean(0) == 0).any()  # the naive formula would give log(0)
        ref = torch.logsumexp(L.log_softmax(-1), 0) - math.log(4)
    torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=1e-6)
    nn.functional.nll_loss(out, torch.arange(5) % C_DIM).backward()
    assert torch.isfinite(x.grad).all()


def test_gradients_flow_through_every_member():
    ens = ensemble(n_members=4, eps=1.0)
    x = images(3, seed=8).requires_grad_(True)
    L = ens.member_logits(x)
    for k in range(4):
        (grad,) = torch.autograd.grad(L[k].sum(), x, retain_graph=True)
        assert grad.abs().sum() > 0
    # the vote is differentiable by straight-through: its gradient is the soft vote's (#19)
    w = torch.randn(3, C_DIM, generator=torch.Generator().manual_seed(0))
    (g_vote,) = torch.autograd.grad((ens(x, aggregate="vote") * w).sum(), x)
    (g_soft,) = torch.autograd.grad((ens(x, aggregate="soft_vote") * w).sum(), x)
    assert g_vote.abs().sum() > 0
    torch.testing.assert_close(g_vote, g_soft, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("aggregate", ["mean", "logit_mean"])
def test_gradcheck_through_chunked_members(aggregate):
    model = TinyNet("tanh", dtype=torch.float64)
    cal = images(5 * H_DIM, seed=1, dtype=torch.float64)
    ens = SymmetryEnsemble(model, cal, 5, eps=1.0, aggregate=aggregate, chunk_size=2,
                           samples_per_member=H_DIM)
    x = images(1, seed=9, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(ens, (x,), eps=1e-6, atol=1e-5, fast_mode=True)
    assert torch.autograd.gradcheck(ens.member_logits, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_chunking_does_not_change_results():
    x = images(10, seed=10)
    outs = {}
    for chunk in (1, 3, None):
        ens = ensemble(n_members=7, chunk_size=chunk)
        xg = x.clone().requires_grad_(True)
        out = ens(xg, aggregate="mean")
        out.logsumexp(1).sum().backward()
        with torch.no_grad():
            outs[chunk] = (out.detach(), xg.grad, ens.member_logits(x))
    for chunk in (1, 3):
        for a, b in zip(outs[chunk], outs[None], strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    tiny = ensemble(n_members=7, max_chunk_bytes=1)  # one member per chunk
    with torch.no_grad():
        torch.testing.assert_close(tiny(x, aggregate="mean"), outs[None][0], atol=1e-6, rtol=1e-6)
        tiny._pointwise = False  # the (B, c, h) layout used for non-elementwise σ
        torch.testing.assert_close(tiny.member_logits(x), outs[None][2], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Members: seeds, resampling, transforms
# ---------------------------------------------------------------------------------------------


def test_seed_resample_and_stochastic_mode():
    a, b = ensemble(seed=3), ensemble(seed=3)
    assert torch.equal(a.g, b.g) and torch.equal(a.W, b.W)
    assert not a.is_stochastic
    g0 = a.g.clone()
    a.resample()
    assert not torch.equal(a.g, g0)
    a.resample(seed=3)
    assert torch.equal(a.g, g0)
    x = images(4, seed=11)
    with torch.no_grad():
        assert torch.equal(a(x), a(x))
        stoch = ensemble(resample_on_forward=True)
        assert stoch.is_stochastic
        assert not torch.equal(stoch(x), stoch(x))


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_every_transform_runs(transform):
    ens = ensemble(n_members=6, transform=transform, eps=1.5)
    assert ens.transform == transform and ens.num_members == 6
    x = images(5, seed=12)
    with torch.no_grad():
        assert ens.member_logits(x).shape == (6, 5, C_DIM)
        assert torch.isfinite(ens(x)).all()
    assert ens.g.shape == (6, H_DIM, H_DIM) and ens.W.shape == (6, C_DIM, H_DIM)


def test_transform_structure():
    eps = 1.5
    U = TinyNet().head.U.weight.double()
    ens = ensemble(transform="random", eps=eps)
    ratio = ens.W / U
    assert ((ratio >= 1) & (ratio < 1 + eps)).all()
    assert torch.allclose(ratio, ratio[:, :1, :].expand_as(ratio))  # a diagonal g′: column scaling
    narrow = TinyNet(hidden=3)  # C ≥ h, so g′ can be read back from W = U g′
    full = SymmetryEnsemble(narrow, None, 5, eps=eps, transform="random_full")
    U3 = narrow.head.U.weight.double().expand(5, -1, -1)
    M = (torch.linalg.lstsq(U3, full.W).solution - torch.eye(3, dtype=torch.float64)) / eps
    assert M.min() >= -1e-9 and M.max() < 1 + 1e-9 and M.std() > 0.1
    perm = ensemble(transform="perm_interp", eps=eps)
    torch.testing.assert_close(perm.g.sum(-1), torch.ones(5, H_DIM, dtype=torch.float64))
    torch.testing.assert_close(perm.W @ perm.g, U.expand(5, -1, -1))
    ginv = ensemble(transform="ginv", eps=eps)
    torch.testing.assert_close(ginv.W @ ginv.g, U.expand(5, -1, -1))
    group, shuffle = ensemble(seed=4), ensemble(transform="shuffle", seed=4)
    torch.testing.assert_close(group.g, shuffle.g)  # same g, π shuffled
    assert not torch.allclose(group.W, shuffle.W)


# ---------------------------------------------------------------------------------------------
# Module behaviour: devices, dtypes, modes, state dicts
# ---------------------------------------------------------------------------------------------


def test_state_dict_round_trip_and_dtype_moves():
    a = ensemble(seed=1)
    b = ensemble(seed=2)
    x = images(6, seed=13)
    with torch.no_grad():
        assert not torch.equal(a(x), b(x))
        b.load_state_dict(a.state_dict())
        assert torch.equal(a(x), b(x))
    keys = a.state_dict().keys()
    assert {"g", "W", "b", "condition", "calibration_hidden"} <= set(keys)
    assert any(k.startswith("base_model.") for k in keys)
    a.float()  # members stay float64 across dtype casts ...
    assert a.g.dtype == torch.float64 and a.W.dtype == torch.float64
    a.to("cpu")  # ... and follow device moves
    assert a.g.device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_built_under_inference_mode_can_be_differentiated_later():
    model = TinyNet()
    with torch.inference_mode():
        ens = ensemble(model)
        ens.resample()
    x = images(3, seed=14).requires_grad_(True)
    ens(x).sum().backward()
    assert x.grad is not None


def test_train_eval_modes_propagate():
    ens = ensemble()
    ens.train()
    assert ens.base_model.training
    ens.eval()
    assert not ens.base_model.training


def test_uint8_calibration_images_are_scaled():
    model = TinyNet()
    cal8 = (images(5 * H_DIM, seed=1) * 255).round().to(torch.uint8)
    a = SymmetryEnsemble(model, cal8, 5, eps=1.0, samples_per_member=H_DIM)
    b = SymmetryEnsemble(model, cal8.float() / 255, 5, eps=1.0, samples_per_member=H_DIM)
    assert torch.equal(a.W, b.W)


# ---------------------------------------------------------------------------------------------
# Other models
# ---------------------------------------------------------------------------------------------


def test_from_modules_wraps_a_user_network():
    net = UserNet().eval()
    cal = images(4 * H_DIM, seed=1)
    ens = SymmetryEnsemble.from_modules(
        net, cal, embed="features", V="fc1", act="act", U="fc2", num_members=4, eps=2.0,
        samples_per_member=H_DIM,
    )
    own, base = own_block_logits(ens, cal)
    assert (own - base).abs().max() <= 1e-4
    ident = SymmetryEnsemble.from_modules(
        net, cal, embed=net.features, V=net.fc1, act=net.act, U="fc2", transform="identity",
        samples_per_member=H_DIM,
    )
    x = images(3, seed=2)
    with torch.no_grad():
        assert torch.equal(ident.member_logits(x)[0], net(x))


def test_from_modules_errors():
    net = UserNet().eval()
    cal = images(4 * H_DIM, seed=1)
    kw = {"num_members": 4, "samples_per_member": H_DIM}
    with pytest.raises(ValueError, match="not a submodule"):
        SymmetryEnsemble.from_modules(net, cal, embed="features", V="fc9", act="act", U="fc2", **kw)
    with pytest.raises(ValueError, match="expected an nn.Linear"):
        SymmetryEnsemble.from_modules(net, cal, embed="features", V="act", act="act", U="fc2", **kw)
    with pytest.raises(ValueError, match="same hidden width"):
        SymmetryEnsemble.from_modules(
            net, cal, embed=None, V="features.1", act="act", U="fc2", **kw
        )
    with pytest.raises(ValueError, match="differs from U"):  # wrong activation
        SymmetryEnsemble.from_modules(
            net, cal, embed="features", V="fc1", act=torch.tanh, U="fc2", **kw
        )
    with pytest.raises(ValueError, match="no symmetry head"):
        SymmetryEnsemble(net, cal, **kw)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in ("resnet34", "resnet50") else n
        for n in list_models()
    ],
)
def test_every_registered_model(name):
    model = create_model(name).eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ens = SymmetryEnsemble(model, x, num_members=2, samples_per_member=2, eps=1.0, chunk_size=1)
    with torch.no_grad():
        L = ens.member_logits(x)
        base = model(x)
    assert L.shape == (2, 4, 10)
    scale = 1 + base.abs().max()
    assert (L[0, :2] - base[:2]).abs().max() <= 1e-4 * scale
    assert (L[1, 2:] - base[2:]).abs().max() <= 1e-4 * scale


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_constructor_errors():
    model = TinyNet()
    cal = images(5 * H_DIM, seed=1)
    with pytest.raises(ValueError, match=r"needs at least 30 calibration images .* got 29"):
        SymmetryEnsemble(model, cal[:29], 5, samples_per_member=H_DIM)
    with pytest.raises(ValueError, match="needs at least"):
        SymmetryEnsemble(model, None, 5, samples_per_member=H_DIM)
    SymmetryEnsemble(model, None, 5, transform="ginv")  # baselines need no calibration
    with pytest.raises(ValueError, match="unknown transform"):
        SymmetryEnsemble(model, cal, 5, transform="rotate", samples_per_member=H_DIM)
    with pytest.raises(ValueError, match="unknown aggregate"):
        SymmetryEnsemble(model, cal, 5, aggregate="max", samples_per_member=H_DIM)
    with pytest.raises(ValueError, match="eps"):
        SymmetryEnsemble(model, cal, 5, eps=-1.0, samples_per_member=H_DIM)
    with pytest.raises(ValueError, match="num_members"):
        SymmetryEnsemble(model, cal, 0, samples_per_member=H_DIM)
    with pytest.raises(ValueError, match="only apply to the transforms that solve"):
        SymmetryEnsemble(model, cal, 5, transform="ginv", ridge=1e-6)
    with pytest.raises(ValueError, match="head_dtype"):
        SymmetryEnsemble(model, cal, 5, head_dtype=torch.float16, samples_per_member=H_DIM)


def test_rank_deficient_member_names_member_and_condition():
    model = TinyNet()
    cal = images(5 * H_DIM, seed=1)
    cal[2 * H_DIM + 1] = cal[2 * H_DIM]  # member 2 sees a duplicated image
    with pytest.raises(
        ValueError, match=r"member 2: .*rank-deficient .*condition number.*12 and 13"
    ):
        SymmetryEnsemble(model, cal, 5, eps=1.0, samples_per_member=H_DIM)
    ens = SymmetryEnsemble(model, cal, 5, eps=1.0, ridge=1e-10,
                           samples_per_member=H_DIM)  # regularized only when asked
    assert ens.condition[2] > 1e7 and torch.isfinite(ens.W).all()
    own, base = own_block_logits(ens, cal)
    assert (own - base).abs().max() < 1e-2  # the ridge trades exactness for stability


def test_relu_zero_columns_are_rank_deficient():
    model = TinyNet("relu")
    with torch.no_grad():
        model.head.V.bias.fill_(-100.0)  # every pre-activation negative: σ(gH) = 0 for g = I
    with pytest.raises(ValueError, match=r"member 0: .*condition number inf .*after 3 redraws"):
        SymmetryEnsemble(model, images(5 * H_DIM, seed=1), 5, eps=0.0, samples_per_member=H_DIM)


def test_ill_conditioned_members_are_redrawn(caplog):
    model = TinyNet()
    cal = images(20 * H_DIM, seed=1)
    limit = float(SymmetryEnsemble(model, cal, 20, eps=3.0, samples_per_member=H_DIM).condition.median())
    with pytest.raises(ValueError, match="after 0 redraws"):
        SymmetryEnsemble(model, cal, 20, eps=3.0, max_condition=limit, max_redraws=0,
                         samples_per_member=H_DIM)
    with caplog.at_level("WARNING", logger="symensemble.ensembles.transforms"):
        ens = SymmetryEnsemble(model, cal, 20, eps=3.0, max_condition=limit, max_redraws=60,
                               samples_per_member=H_DIM)
    assert "redrawing" in caplog.text
    assert (ens.condition <= limit).all()
    own, base = own_block_logits(ens, cal)
    assert (own - base).abs().max() <= 1e-4


def test_head_the_transform_cannot_handle():
    model = TinyNet()
    model.head.V = nn.Sequential(nn.Linear(10, H_DIM))
    with pytest.raises(ValueError, match="expected an nn.Linear"):
        SymmetryEnsemble(model, images(30), 5, samples_per_member=H_DIM)
    parts = HeadParts(TinyNet().embed, TinyNet().head.V, torch.tanh, TinyNet().head.U)
    with pytest.raises(ValueError, match="submodule of the model"):
        SymmetryEnsemble(TinyNet(), images(30), 5, head=parts, samples_per_member=H_DIM)


def test_public_api():
    assert symensemble.SymmetryEnsemble is SymmetryEnsemble
    assert callable(symensemble.load_model)
    assert set(TRANSFORMS) == {
        "group",
        "ginv",
        "random",
        "random_full",
        "shuffle",
        "perm_interp",
        "identity",
    }


# ---------------------------------------------------------------------------------------------
# CIFAR-10: the paper's Figure 10 pattern (skips without data or the shipped checkpoint)
# ---------------------------------------------------------------------------------------------

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "paper_cnn.safetensors"


@pytest.fixture(scope="module")
def cifar():
    root = os.environ.get("SYMENSEMBLE_DATA")
    if not root:
        pytest.skip("set SYMENSEMBLE_DATA to a CIFAR-10 source to run the CIFAR test")
    if not CHECKPOINT.is_file():
        pytest.skip(f"no shipped checkpoint at {CHECKPOINT}")
    data_mod = pytest.importorskip("symensemble.data")
    try:
        return data_mod.load_cifar10(root)
    except ValueError as err:
        pytest.skip(f"no CIFAR-10 at SYMENSEMBLE_DATA={root!r}: {err}")


@pytest.mark.cifar
def test_figure10_pattern_on_cifar10(cifar):
    """Figure 10 at eps = 10, 200 members, vote: group keeps most of the accuracy, baselines fall
    to chance. Measured on 2,000 test images, 3 seeds (docs/ensembles.md): base 0.641; group
    0.487–0.515 with s = h = 16 (the paper's), 0.606–0.612 with s = 2h (the default); ginv, random and shuffle
    0.08–0.13."""
    model = symensemble.load_model(CHECKPOINT)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(cifar.test), generator=gen)[:1000]
    x, y = cifar.test.images[idx].float() / 255, cifar.test.labels[idx]
    # The training split is stored class by class: draw the calibration images at random.
    cal = cifar.train.images[torch.randperm(len(cifar.train), generator=gen)[: 200 * 32]]
    with torch.no_grad():
        base = (model(x).argmax(1) == y).float().mean().item()
        acc = {}
        for name, transform, s in [
            ("group", "group", 16),  # the paper's s = h
            ("group_2h", "group", None),  # the default, s = 2h
            ("ginv", "ginv", None),
            ("random", "random", None),
            ("shuffle", "shuffle", None),
        ]:
            ens = SymmetryEnsemble(
                model,
                cal,
                200,
                eps=10.0,
                transform=transform,
                samples_per_member=s,
                aggregate="vote",
            )
            acc[name] = (ens(x).argmax(1) == y).float().mean().item()
    assert abs(acc["group_2h"] - base) <= 0.08, (base, acc)
    assert base - acc["group"] <= 0.2, (base, acc)
    for name in ("ginv", "random", "shuffle"):
        assert acc[name] <= 0.2, (base, acc)
        assert acc["group"] >= acc[name] + 0.2, (base, acc)
