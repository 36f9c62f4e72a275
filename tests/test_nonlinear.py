"""The nonlinear data-dependent action: R_z, Theorem 4.1, Prop. D.5, eq. (9), Prop. 4.2, π(g, H)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from symensemble.symmetry.activations import create_activation
from symensemble.symmetry.nonlinear import (
    R_inverse,
    R_matrix,
    equivariance,
    lipschitz_bound,
    nonlinear_action,
    nonlinear_action_multilayer,
)
from symensemble.symmetry.pi_solver import pi_matrix, right_pinv_solve
from symensemble.symmetry.stack import StackParams

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


NONVANISHING = ["leaky_relu", "tanh", "sigmoid", "radial", "identity"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def random_g(*batch: int, h: int, scale: float = 0.5, seed: int = 0) -> torch.Tensor:
    return torch.linalg.matrix_exp(scale * randn(*batch, h, h, seed=seed) / math.sqrt(h))


def mlp_forward(weights, biases, x, activations):
    return StackParams(weights, biases).forward(x, activations)


def action(*args, **kwargs):
    """nonlinear_action as the (U', V', b_V') triple the checks below compare."""
    new = nonlinear_action(*args, **kwargs)
    return new.U, new.V, new.b_V


def multilayer_action(weights, biases, *args, **kwargs):
    """nonlinear_action_multilayer on StackParams(weights, biases), as (weights', biases') lists."""
    new = nonlinear_action_multilayer(StackParams(weights, biases), *args, **kwargs)
    return list(new.weights), list(new.biases)


def forward(U, V, x, sigma, b_V=None, b_U=None):
    z = (V @ x.unsqueeze(-1)).squeeze(-1)
    if b_V is not None:
        z = z + b_V
    out = (U @ sigma(z).unsqueeze(-1)).squeeze(-1)
    return out if b_U is None else out + b_U


def special_vectors(h: int) -> torch.Tensor:
    """Vectors with zero, negative and zero-tail coordinates (all nonzero overall)."""
    rows = [randn(h, seed=1), -randn(h, seed=2).abs()]
    e = torch.zeros(h, dtype=F64)
    for i in range(h):
        v = e.clone()
        v[i] = -1.5 if i % 2 else 2.0
        rows.append(v)  # one nonzero coordinate, zeros before and after
    if h > 2:
        v = randn(h, seed=3)
        v[1] = 0.0
        v[-1] = 0.0
        rows.append(v)
        v = randn(h, seed=4)
        v[h // 2 :] = 0.0
        rows.append(v)  # zero tail
        v = randn(h, seed=5)
        v[:-1] = 0.0
        v[-1] = -3.0
        rows.append(v)  # only a negative last coordinate
    return torch.stack(rows)


def reference_R(z: list[float]) -> torch.Tensor:
    """Definition D.1 / Prop. D.3 literally: spherical angles, then the entry formula."""
    h = len(z)
    r = math.sqrt(sum(v * v for v in z))
    alphas, tail = [], r
    for i in range(h - 1):
        rest = math.sqrt(sum(v * v for v in z[i + 1 :]))
        a = math.atan2(rest, z[i]) if i < h - 2 else math.atan2(z[h - 1], z[h - 2])
        alphas.append(a)
        tail *= math.sin(a)
    beta = [0.0, *alphas, 0.0]  # beta_0 = beta_h = 0
    R = torch.zeros(h, h, dtype=F64)
    for i in range(1, h + 1):
        for j in range(1, h + 1):
            if j <= i:
                prod = math.prod(math.sin(beta[k]) for k in range(j, i))
                R[i - 1, j - 1] = math.cos(beta[j - 1]) * prod * math.cos(beta[i])
            elif j == i + 1:
                R[i - 1, j - 1] = -math.sin(beta[i])
    return r * R


# ---------------------------------------------------------------------------------------------
# R_z
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h", [1, 2, 3, 5, 16, 33])
def test_R_matrix_properties_float64(h):
    z = torch.cat([randn(50, h, seed=h), special_vectors(h)])
    R = R_matrix(z)
    n2 = z.square().sum(-1)
    eye = torch.eye(h, dtype=F64)
    assert R.shape == (z.shape[0], h, h)
    torch.testing.assert_close(R[..., 0], z, atol=1e-14, rtol=0)
    torch.testing.assert_close(
        R.mT @ R, n2[:, None, None] * eye, atol=1e-12 * n2.max().item(), rtol=0
    )
    torch.testing.assert_close(
        torch.linalg.matrix_norm(R, ord=2), n2.sqrt(), atol=1e-12, rtol=1e-12
    )
    torch.testing.assert_close(R_inverse(z) @ R, eye.expand_as(R), atol=1e-12, rtol=0)


def test_R_matrix_matches_definition_D1():
    for seed, h in [(0, 2), (1, 3), (2, 4), (3, 6)]:
        z = randn(h, seed=seed)
        torch.testing.assert_close(R_matrix(z), reference_R(z.tolist()), atol=1e-12, rtol=0)
    # The paper's n = 2 example: R(β1, β2).
    b1, b2, r = 0.3, 1.1, 2.0
    z = (
        torch.tensor(
            [math.cos(b1), math.sin(b1) * math.cos(b2), math.sin(b1) * math.sin(b2)], dtype=F64
        )
        * r
    )
    expected = r * torch.tensor(
        [
            [math.cos(b1), -math.sin(b1), 0.0],
            [math.sin(b1) * math.cos(b2), math.cos(b1) * math.cos(b2), -math.sin(b2)],
            [math.sin(b1) * math.sin(b2), math.cos(b1) * math.sin(b2), math.cos(b2)],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(R_matrix(z), expected, atol=1e-14, rtol=0)


def test_R_matrix_float32_accuracy_over_scales():
    h = 16
    z = randn(500, h, seed=7, dtype=torch.float32) * torch.logspace(-3, 3, h)
    z = torch.cat([z, special_vectors(h).float(), 1e-30 * randn(3, h, seed=8, dtype=torch.float32)])
    R = R_matrix(z).double()
    zd = z.double()
    n2 = zd.square().sum(-1)
    err = ((R.mT @ R) / n2[:, None, None] - torch.eye(h, dtype=F64)).abs().max()
    assert err < 5e-6
    assert ((R[..., 0] - zd).abs().amax(-1) / n2.sqrt()).max() < 1e-6


def test_R_matrix_batched_leading_dims():
    z = randn(2, 3, 4, seed=9)
    R = R_matrix(z)
    assert R.shape == (2, 3, 4, 4)
    torch.testing.assert_close(R[1, 2], R_matrix(z[1, 2]))


def test_R_matrix_rejects_zero_and_bad_input():
    z = randn(3, 4)
    z[1] = 0.0
    with pytest.raises(ValueError, match=r"nonzero vector.*batch index \(1,\)"):
        R_matrix(z)
    with pytest.raises(ValueError, match="floating-point"):
        R_matrix(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-finite"):
        R_matrix(torch.tensor([1.0, float("nan")]))


# ---------------------------------------------------------------------------------------------
# The two-layer action (Theorem 4.1 / D.4)
# ---------------------------------------------------------------------------------------------


def two_layer(m: int = 3, h: int = 6, n: int = 5, seed: int = 0):
    return (
        randn(m, h, seed=seed),
        randn(h, n, seed=seed + 1),
        randn(h, seed=seed + 2),
        randn(m, seed=seed + 3),
    )


@pytest.mark.parametrize("name", NONVANISHING)
def test_nonlinear_action_preserves_output_at_x(name):
    sigma = create_activation(name)
    U, V, b_V, b_U = two_layer()
    x = randn(20, 5, seed=11)
    g = random_g(20, h=6, scale=1.5, seed=12)
    U2, V2, b2 = action(U, V, x, g, sigma, b_V=b_V)
    assert U2.shape == (20, 3, 6) and V2.shape == (20, 6, 5) and b2.shape == (20, 6)
    torch.testing.assert_close(V2, g @ V)
    err = (forward(U2, V2, x, sigma, b2, b_U) - forward(U, V, x, sigma, b_V, b_U)).abs().max()
    assert err <= 1e-10
    # ... but not elsewhere: the action is data-dependent.
    other = randn(20, 5, seed=13)
    if name != "identity":
        assert (
            forward(U2, V2, other, sigma, b2) - forward(U, V, other, sigma, b_V)
        ).abs().max() > 1e-3


def test_nonlinear_action_without_bias_returns_none_bias():
    sigma = create_activation("tanh")
    U, V, _, _ = two_layer()
    x = randn(5, seed=3)
    res = nonlinear_action(U, V, x, random_g(h=6), sigma)
    assert res.b_V is None
    assert (forward(res.U, res.V, x, sigma) - forward(U, V, x, sigma)).abs().max() <= 1e-10


@pytest.mark.parametrize("name", ["leaky_relu", "tanh", "sigmoid", "radial"])
def test_nonlinear_action_group_axioms(name):
    sigma = create_activation(name)
    U, V, b_V, _ = two_layer(seed=20)
    x = randn(8, 5, seed=21)
    eye = torch.eye(6, dtype=F64).expand(8, 6, 6)
    U1, V1, b1 = action(U, V, x, eye, sigma, b_V=b_V)
    torch.testing.assert_close(U1, U.expand_as(U1), atol=1e-12, rtol=0)
    torch.testing.assert_close(V1, V.expand_as(V1), atol=1e-12, rtol=0)
    torch.testing.assert_close(b1, b_V.expand_as(b1), atol=1e-12, rtol=0)
    g1, g2 = random_g(8, h=6, scale=1.0, seed=22), random_g(8, h=6, scale=1.0, seed=23)
    step = nonlinear_action(U, V, x, g2, sigma, b_V=b_V)
    Ua, Va, ba = action(step.U, step.V, x, g1, sigma, b_V=step.b_V)
    Ub, Vb, bb = action(U, V, x, g1 @ g2, sigma, b_V=b_V)
    torch.testing.assert_close(Ua, Ub, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(Va, Vb, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ba, bb, atol=1e-10, rtol=1e-10)


def test_nonlinear_action_errors():
    U, V, _, _ = two_layer()
    g = random_g(h=6)
    with pytest.raises(ValueError, match="vanishes at nonzero inputs"):
        nonlinear_action(U, V, randn(5), g, create_activation("relu"))
    with pytest.raises(ValueError, match="vanishes at nonzero inputs"):
        nonlinear_action(U, V, randn(5), g, nn.ReLU())
    with pytest.raises(ValueError, match="vanishes at nonzero inputs"):
        nonlinear_action(U, V, randn(5), g, create_activation("relu_sqr"))
    # ReLU allowed explicitly, but an all-negative pre-activation is off the locus.
    V_neg = -V.abs()
    with pytest.raises(ValueError, match="non-degenerate locus"):
        nonlinear_action(U, V_neg, randn(5).abs(), g, nn.ReLU(), require_nonvanishing=False)
    # Vx = 0 with σ(0) = 0 is off the locus; sigmoid (σ(0) ≠ 0) acts everywhere (Thm D.4 (2)).
    zero = torch.zeros(5, dtype=F64)
    with pytest.raises(ValueError, match="non-degenerate locus"):
        nonlinear_action(U, V, zero, g, create_activation("leaky_relu"))
    res = nonlinear_action(U, V, zero, g, create_activation("sigmoid"))
    sig = create_activation("sigmoid")
    assert (forward(res.U, res.V, zero, sig) - forward(U, V, zero, sig)).abs().max() <= 1e-12
    with pytest.raises(ValueError, match="shape"):
        nonlinear_action(U, V, randn(5), randn(5, 5), create_activation("tanh"))
    with pytest.raises(ValueError, match="features"):
        nonlinear_action(U, V, randn(4), g, create_activation("tanh"))
    with pytest.raises(ValueError, match="matching h"):
        nonlinear_action(randn(3, 4), V, randn(5), g, create_activation("tanh"))


# ---------------------------------------------------------------------------------------------
# General equivariance c(g, z) (eq. 9) and Prop. 4.2
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["leaky_relu", "tanh", "sigmoid", "radial"])
def test_equivariance_cocycle(name):
    sigma = create_activation(name)
    h = 5
    z = randn(10, h, seed=30)
    g1, g2 = random_g(10, h=h, scale=1.2, seed=31), random_g(10, h=h, scale=1.2, seed=32)
    eye = torch.eye(h, dtype=F64).expand(10, h, h)
    torch.testing.assert_close(equivariance(eye, z, sigma), eye, atol=1e-12, rtol=0)
    g2z = (g2 @ z.unsqueeze(-1)).squeeze(-1)
    lhs = equivariance(g1, g2z, sigma) @ equivariance(g2, z, sigma)
    torch.testing.assert_close(lhs, equivariance(g1 @ g2, z, sigma), atol=1e-10, rtol=1e-10)
    c = equivariance(g1, z, sigma)
    gz = (g1 @ z.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(
        (c @ sigma(z).unsqueeze(-1)).squeeze(-1), sigma(gz), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("name", ["leaky_relu", "tanh", "sigmoid", "radial"])
def test_lipschitz_bound_holds_on_sampled_pairs(name):
    sigma = create_activation(name)
    U, V, b_V, b_U = two_layer(seed=40)
    x = randn(5, seed=41)
    for seed in range(5):
        g = random_g(h=6, scale=2.0, seed=42 + seed)
        U2, V2, b2 = action(U, V, x, g, sigma, b_V=b_V)
        bound = lipschitz_bound(U, V, x, g, sigma, b_V=b_V)
        x1, x2 = randn(400, 5, seed=50 + seed), randn(400, 5, seed=60 + seed)
        x2 = x1 + torch.logspace(-4, 1, 400, dtype=F64).unsqueeze(-1) * (x2 - x1)
        gap = (forward(U2, V2, x1, sigma, b2, b_U) - forward(U2, V2, x2, sigma, b2, b_U)).norm(
            dim=-1
        )
        assert (gap <= bound * (x1 - x2).norm(dim=-1) * (1 + 1e-12)).all()
    # The original network's bound is η‖U‖‖V‖ (g = I).
    eye = torch.eye(6, dtype=F64)
    op = torch.linalg.matrix_norm
    eta = {"leaky_relu": 1.0, "tanh": 1.0, "sigmoid": 0.25, "radial": 1.0}[name]
    torch.testing.assert_close(
        lipschitz_bound(U, V, x, eye, sigma, b_V=b_V), eta * op(U, ord=2) * op(V, ord=2)
    )


def test_lipschitz_bound_needs_eta_for_unknown_activation():
    U, V, _, _ = two_layer()
    with pytest.raises(ValueError, match="lipschitz_constant"):
        lipschitz_bound(U, V, randn(5), random_g(h=6), create_activation("relu_sqr"))
    value = lipschitz_bound(U, V, randn(5), random_g(h=6), torch.tanh, lipschitz_constant=1.0)
    assert value.ndim == 0 and value > 0


# ---------------------------------------------------------------------------------------------
# Multi-layer action (Prop. D.5)
# ---------------------------------------------------------------------------------------------


def mlp(widths=(5, 7, 6, 4, 3), seed=70):
    Ws = [
        randn(b, a, seed=seed + i) / math.sqrt(a)
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True))
    ]
    bs = [randn(b, seed=seed + 10 + i) for i, b in enumerate(widths[1:])]
    return Ws, bs


def test_multilayer_action_preserves_output_and_axioms():
    Ws, bs = mlp()
    acts = [
        create_activation("leaky_relu"),
        create_activation("tanh"),
        create_activation("sigmoid"),
    ]
    x = randn(6, 5, seed=80)
    hidden = [7, 6, 4]
    gs = [random_g(6, h=n, scale=1.5, seed=81 + i) for i, n in enumerate(hidden)]
    W2, b2 = multilayer_action(Ws, bs, x, gs, acts)
    assert (mlp_forward(W2, b2, x, acts) - mlp_forward(Ws, bs, x, acts)).abs().max() <= 1e-10
    # Z_i ↦ g_i Z_i for the hidden layers.
    z1 = (Ws[0] @ x.unsqueeze(-1)).squeeze(-1) + bs[0]
    z1_new = (W2[0] @ x.unsqueeze(-1)).squeeze(-1) + b2[0]
    torch.testing.assert_close(z1_new, (gs[0] @ z1.unsqueeze(-1)).squeeze(-1))
    # Identity axiom.
    eyes = [torch.eye(n, dtype=F64).expand(6, n, n) for n in hidden]
    W1, b1 = multilayer_action(Ws, bs, x, eyes, acts)
    for a, b in zip(W1, Ws, strict=True):
        torch.testing.assert_close(a, b.expand_as(a), atol=1e-12, rtol=0)
    for a, b in zip(b1, bs, strict=True):
        torch.testing.assert_close(a, b.expand_as(a), atol=1e-12, rtol=0)
    # Composition axiom.
    hs = [random_g(6, h=n, scale=1.0, seed=90 + i) for i, n in enumerate(hidden)]
    Wa, ba = multilayer_action(W2, b2, x, hs, acts)
    products = [p @ q for p, q in zip(hs, gs, strict=True)]
    Wb, bb = multilayer_action(Ws, bs, x, products, acts)
    for a, b in zip(Wa + ba, Wb + bb, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_multilayer_action_without_biases_and_errors():
    Ws, _ = mlp(widths=(4, 5, 3))
    act = [create_activation("tanh")]
    x = randn(4, seed=5)
    W2, b2 = multilayer_action(Ws, None, x, [random_g(h=5)], act)
    assert b2 == [None, None]
    assert (mlp_forward(W2, None, x, act) - mlp_forward(Ws, None, x, act)).abs().max() <= 1e-10
    with pytest.raises(ValueError, match="one g per hidden layer"):
        multilayer_action(Ws, None, x, [], act)
    with pytest.raises(ValueError, match="vanishes"):
        multilayer_action(Ws, None, x, [random_g(h=5)], [nn.ReLU()])
    with pytest.raises(ValueError, match="hidden activations"):
        multilayer_action(Ws, None, x, [random_g(h=5)], [])
    with pytest.raises(ValueError, match="non-degenerate locus"):
        multilayer_action(Ws, None, torch.zeros(4, dtype=F64), [random_g(h=5)], act)


# ---------------------------------------------------------------------------------------------
# π(g, H) = σ(H) σ(gH)⁺ (App. I)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [1, 4, 8])
def test_pi_matrix_reproduces_samples(s):
    h = 8
    sigma = create_activation("leaky_relu")
    H = randn(5, h, s, seed=100)
    g = random_g(5, h=h, scale=3.0, seed=101)
    U = randn(3, h, seed=102)
    sol = pi_matrix(g, H, sigma, U=U)
    A, B = sigma((g @ H).mT).mT, sigma(H.mT).mT
    assert (
        sol.pi.shape == (5, h, h) and sol.upper.shape == (5, 3, h) and sol.condition.shape == (5,)
    )
    torch.testing.assert_close(sol.pi @ A, B, atol=1e-9, rtol=0)
    torch.testing.assert_close(sol.upper @ A, U @ B, atol=1e-9, rtol=0)
    torch.testing.assert_close(sol.upper, U @ sol.pi, atol=1e-8, rtol=1e-8)
    sv = torch.linalg.svdvals(A)
    torch.testing.assert_close(sol.condition, sv[:, 0] / sv[:, -1])


def test_pi_matrix_least_squares_when_s_exceeds_h():
    h, s = 4, 9
    sigma = create_activation("tanh")
    H, g = randn(h, s, seed=110), random_g(h=h, seed=111)
    pi = pi_matrix(g, H, sigma).pi
    A, B = sigma((g @ H).mT).mT, sigma(H.mT).mT
    torch.testing.assert_close(pi, B @ torch.linalg.pinv(A), atol=1e-10, rtol=0)


def _singular_at_batch_one(seed, h=6):
    """σ = leaky ReLU, H (3, h, h) whose batch entry 1 repeats a sample (σ(gH) singular), g."""
    H = randn(3, h, h, seed=seed)
    H[1, :, 3] = H[1, :, 2]  # duplicated sample → σ(gH) singular
    return create_activation("leaky_relu"), H, random_g(3, h=h, seed=seed + 1)


def test_pi_matrix_rank_deficient_and_ridge():
    sigma, H, g = _singular_at_batch_one(120)
    with pytest.raises(ValueError, match=r"rank-deficient at batch index \(1,\).*condition number"):
        pi_matrix(g, H, sigma)
    sol = pi_matrix(g, H, sigma, ridge=1e-12)
    assert torch.isfinite(sol.pi).all()
    assert sol.condition[1] > 1e15
    assert sol.condition[0] < 1e8


@pytest.mark.parametrize("shape", [(6, 6), (6, 3), (3, 6)])
def test_right_pinv_solve_matches_pinv(shape):
    A = randn(4, *shape, seed=130)
    B = randn(4, 2, shape[1], seed=131)
    torch.testing.assert_close(
        right_pinv_solve(B, A), B @ torch.linalg.pinv(A), atol=1e-10, rtol=1e-10
    )
    torch.testing.assert_close(
        right_pinv_solve(B, A, ridge=0.0), B @ torch.linalg.pinv(A), atol=1e-10, rtol=1e-10
    )


@pytest.mark.parametrize("shape", [(6, 6), (6, 3), (3, 6)])
def test_right_pinv_solve_rank_deficient_gives_the_minimum_norm_solution(shape):
    A = randn(4, *shape, seed=140)
    B = randn(4, 2, shape[1], seed=141)
    A[1, :, 1] = A[1, :, 0]  # duplicated column
    A[2] = 0.0  # zero matrix
    A[3, :, 2] = 0.0  # zero column (e.g. a sample ReLU zeroes entirely)
    X = right_pinv_solve(B, A)
    assert torch.isfinite(X).all()
    torch.testing.assert_close(X, B @ torch.linalg.pinv(A), atol=1e-10, rtol=1e-10)
    # the well-posed entry keeps the exact solve
    torch.testing.assert_close(X[0], right_pinv_solve(B[0], A[0]), atol=0, rtol=0)


def test_pi_matrix_reports_rank_deficiency_but_stays_finite_without_a_limit():
    h = 6
    sigma, H, g = _singular_at_batch_one(150, h)
    U = randn(2, h, seed=152)
    sol = pi_matrix(g, H, sigma, U=U, max_condition=math.inf)
    assert torch.isfinite(sol.pi).all() and torch.isfinite(sol.upper).all()
    assert sol.condition[1] > 1e15
    A, B = sigma((g @ H).mT).mT, sigma(H.mT).mT
    torch.testing.assert_close(sol.pi, B @ torch.linalg.pinv(A), atol=1e-9, rtol=1e-9)
