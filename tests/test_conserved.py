"""Conserved quantities (Prop. 5.1, Examples 5.2-5.3, eq. 47, Theorem 5.2) along gradient flow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from symensemble.diagnostics.common import TwoLayerProblem, gradient_flow
from symensemble.symmetry.activations import create_activation
from symensemble.symmetry.conserved import (
    TwistedQ,
    angular_momentum,
    angular_momentum_residual,
    conserved_quantities,
    homogeneous_q,
    imbalance,
    orbit_scale_for_target,
    q_m,
    total_q,
    unit_q,
)
from symensemble.symmetry.elementwise import antiderivative_sigma_over_dsigma, elementwise_q
from symensemble.symmetry.groups import HiddenGroup
from symensemble.symmetry.linear import LinearSymmetry, stack_forward
from symensemble.symmetry.stack import StackParams
from symensemble.testing import assert_conserved, conservation_error

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _flow_problem(widths, act_names, seed=0, samples=24):
    gen = torch.Generator().manual_seed(seed)
    params = StackParams.random(widths, generator=gen)
    acts = [create_activation(a) for a in act_names]
    x = torch.randn(samples, widths[0], generator=gen, dtype=F64)
    y = torch.randn(samples, widths[-1], generator=gen, dtype=F64)

    def loss(p: StackParams) -> torch.Tensor:
        return (stack_forward(p, acts, x) - y).square().mean()

    def grad(flat: torch.Tensor) -> torch.Tensor:
        p = params.unflatten(flat).requires_grad_()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(p), p.tensors())])

    return params, acts, loss, grad


@pytest.mark.parametrize(
    "acts,dt,steps,tol",
    [
        (["identity"], 0.005, 600, 1e-9),  # smooth: RK4 error O(dt^4)
        (["leaky_relu"], 0.002, 1000, 1e-6),  # kinks cost RK4 its order where units switch
        (["relu"], 0.002, 1000, 1e-6),
        (["identity", "leaky_relu"], 0.002, 1500, 1e-6),
    ],
    ids=["linear", "leaky_relu", "relu", "3layer"],
)
def test_layer_quantities_conserved_along_gradient_flow(acts, dt, steps, tol):
    widths = (4, 6, 3) if len(acts) == 1 else (4, 5, 6, 3)
    params, act_mods, loss, grad = _flow_problem(widths, acts)
    traj = gradient_flow(grad, params.flatten(), dt, steps, every=steps // 10)
    qs = [conserved_quantities(params.unflatten(t), act_mods) for t in traj]
    for layer in range(len(acts)):
        assert_conserved(torch.stack([q[layer] for q in qs]), tol=tol, name=f"Q layer {layer + 1}")
    totals = torch.stack([total_q(params.unflatten(t)) for t in traj])
    assert conservation_error(totals) < tol
    losses = [float(loss(params.unflatten(t))) for t in traj]
    assert losses[-1] < 0.8 * losses[0]
    if acts == ["identity"]:  # every entry of the matrix mu is conserved, not just the diagonal
        assert qs[0][0].shape == (6, 6)
        # ... while a generic non-conserved function (the plain weight norm) drifts
        norms = torch.stack([params.unflatten(t).weights[0].square().sum() for t in traj])
        assert conservation_error(norms) > 1e3 * tol


def test_q_m_matches_the_closed_forms_and_is_zero_for_antisymmetric_m():
    gen = torch.Generator().manual_seed(1)
    params = StackParams.random((4, 5, 3), generator=gen)
    gl = LinearSymmetry.for_activations(["identity"], [5])
    A = torch.randn(5, 5, generator=gen, dtype=F64)
    M = A + A.T
    torch.testing.assert_close(q_m(params, (M,), gl), (imbalance(params)[0] * M).sum())
    assert abs(float(q_m(params, (A - A.T,), gl))) < 1e-12
    d = torch.randn(5, generator=gen, dtype=F64)
    for alpha in (1.0, 2.0):
        sc = LinearSymmetry((HiddenGroup("scaling", 5, alpha),))
        torch.testing.assert_close(
            q_m(params, (torch.diag(d),), sc), (homogeneous_q(params, alpha)[0] * d).sum()
        )


def test_homogeneous_q_accepts_any_real_scalar_alpha():
    params = StackParams.random((4, 5, 3, 2), generator=torch.Generator().manual_seed(3))
    ref = homogeneous_q(params, 2.0)
    for alpha in (2, np.float64(2.0), np.float32(2.0), np.int64(2), np.array(2.0), torch.tensor(2.0)):
        for got, want in zip(homogeneous_q(params, alpha), ref, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [float(q.sum()) for q in homogeneous_q(params, [np.float64(1.0), torch.tensor(2.0)])] == [
        float(homogeneous_q(params, 1.0)[0].sum()),
        float(ref[1].sum()),
    ]
    W, b, W_next = params.weights[0], params.biases[0], params.weights[1]
    torch.testing.assert_close(
        unit_q(params, 2.0), W.square().sum(1) + b.square() - 2.0 * W_next.square().sum(0)
    )
    with pytest.raises(ValueError, match="got 1 alphas for 2 hidden layers"):
        homogeneous_q(params, [1.0])


def test_conserved_quantities_refuse_sigmoid_and_give_none_for_radial():
    params = StackParams.random((3, 4, 2))
    assert conserved_quantities(params, ["radial"]) == (None,)
    with pytest.raises(ValueError, match="'sigmoid' has no continuous linear symmetry"):
        conserved_quantities(params, ["sigmoid"])


# --------------------------------------------------------------------------------------------
# eq. 47: elementwise Q of the whitened two-layer network
# --------------------------------------------------------------------------------------------


def test_antiderivative_closed_forms_match_quadrature():
    v = torch.linspace(-2.5, 2.5, 41, dtype=F64)
    for name in ("identity", "leaky_relu", "tanh", "sigmoid"):
        closed = antiderivative_sigma_over_dsigma(name, v, method="closed")
        quad = antiderivative_sigma_over_dsigma(name, v, method="quadrature")
        torch.testing.assert_close(quad, closed, rtol=1e-12, atol=1e-12)
    # d/dv F = sigma / sigma'
    v = torch.tensor([0.3, -0.7, 1.4], dtype=F64, requires_grad=True)
    (dF,) = torch.autograd.grad(antiderivative_sigma_over_dsigma("tanh", v).sum(), v)
    torch.testing.assert_close(dF, torch.sinh(v) * torch.cosh(v))
    with pytest.raises(ValueError, match="diverges"):
        antiderivative_sigma_over_dsigma("relu_sqr", torch.tensor([-1.0], dtype=F64))
    with pytest.raises(ValueError, match="not pointwise"):
        antiderivative_sigma_over_dsigma("radial", v)
    with pytest.raises(ValueError, match="no closed form"):
        antiderivative_sigma_over_dsigma("relu_sqr", v, method="closed")


@pytest.mark.parametrize("act", ["identity", "relu", "tanh", "sigmoid", "relu_sqr"])
def test_elementwise_q_conserved_along_gradient_flow(act):
    gen = torch.Generator().manual_seed(2)
    m, h, n = 3, 5, 4
    Y = torch.randn(m, n, generator=gen, dtype=F64)
    U0 = torch.randn(m, h, generator=gen, dtype=F64) * 0.5
    # relu_sqr: sigma' vanishes at -0.5, keep V where the integral exists (quadrature path)
    V0 = (
        torch.rand(h, n, generator=gen, dtype=F64) * 0.6 + 0.1
        if act == "relu_sqr"
        else (torch.randn(h, n, generator=gen, dtype=F64) * 0.5)
    )
    prob = TwoLayerProblem(Y, act, "half")

    def grad(flat):
        U, V = flat[: m * h].view(1, m, h), flat[m * h :].view(1, h, n)
        _, gU, gV = prob.loss_and_grads(U, V)
        return torch.cat([gU.reshape(-1), gV.reshape(-1)])

    x0 = torch.cat([U0.reshape(-1), V0.reshape(-1)])
    traj = gradient_flow(
        grad,
        x0,
        0.01 if act not in ("relu",) else 0.002,
        300 if act != "relu" else 1500,
        every=50 if act != "relu" else 250,
    )
    qs = torch.stack([elementwise_q(t[: m * h].view(m, h), t[m * h :].view(h, n), act) for t in traj])
    assert_conserved(qs, tol=1e-7 if act != "relu" else 1e-6, name=f"eq. 47 Q ({act})")
    loss = [float(prob.loss(t[: m * h].view(1, m, h), t[m * h :].view(1, h, n))) for t in traj]
    assert loss[-1] < 0.9 * loss[0]


def test_gradient_descent_changes_linear_q_exactly_as_prop_e1():
    gen = torch.Generator().manual_seed(3)
    prob = TwoLayerProblem(torch.randn(3, 4, generator=gen, dtype=F64), "identity", "sum")
    U = torch.randn(1, 3, 6, generator=gen, dtype=F64)
    V = torch.randn(1, 6, 4, generator=gen, dtype=F64)
    for lr in (0.05, 0.01):
        _, gU, gV = prob.loss_and_grads(U, V)
        q0 = U.square().sum() - V.square().sum()
        U1, V1 = U - lr * gU, V - lr * gV
        dq = U1.square().sum() - V1.square().sum() - q0
        predicted = lr**2 * (gU.square().sum() - gV.square().sum())
        assert abs(float(dq - predicted)) < 1e-12 * float(q0.abs() + 1)
        assert abs(float(dq)) <= lr**2 * float(gU.square().sum() + gV.square().sum())


# --------------------------------------------------------------------------------------------
# Theorem 5.2: angular momentum of radial networks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["tanh", "shifted_relu"])
def test_radial_angular_momentum_vanishes_along_the_flow(profile):
    widths = (4, 5, 3)
    gen = torch.Generator().manual_seed(4)
    params = StackParams.random(widths, generator=gen)
    act = create_activation("radial", profile=profile, shift=0.2 if profile == "shifted_relu" else 0.0)
    x = torch.randn(20, 4, generator=gen, dtype=F64)
    y = torch.randn(20, 3, generator=gen, dtype=F64)

    def grad_of(p: StackParams) -> StackParams:
        q = p.requires_grad_()
        loss = (stack_forward(q, [act], x) - y).square().mean()
        return q.with_tensors(torch.autograd.grad(loss, q.tensors()))

    def grad(flat):
        return grad_of(params.unflatten(flat)).flatten()

    traj = gradient_flow(grad, params.flatten(), 0.05, 100, every=20)
    for t in traj:
        p = params.unflatten(t)
        g = grad_of(p)
        assert angular_momentum_residual(p, g) < 1e-12
        (nu,) = angular_momentum(p, g * -1.0)
        torch.testing.assert_close(nu, -nu.T)
    # the same residual is O(1) for an activation without the O(h) symmetry
    tanh = create_activation("tanh")
    q = params.requires_grad_()
    loss = (stack_forward(q, [tanh], x) - y).square().mean()
    g = q.with_tensors(torch.autograd.grad(loss, q.tensors()))
    assert angular_momentum_residual(params, g) > 1e-3


# --------------------------------------------------------------------------------------------
# Q under the group: Q_M(g.theta) = Q_{g^T M g}(theta)
# --------------------------------------------------------------------------------------------


def test_q_transforms_under_the_group():
    gen = torch.Generator().manual_seed(5)
    params = StackParams.random((4, 5, 3), generator=gen)
    A = torch.randn(5, 5, generator=gen, dtype=F64)
    M = A + A.T
    for sym, Mk in (
        (LinearSymmetry.for_activations(["identity"], [5]), M),
        (LinearSymmetry.for_activations(["relu"], [5]), torch.diag(torch.diagonal(M))),
        (LinearSymmetry((HiddenGroup("scaling", 5, 2.0),)), torch.diag(torch.diagonal(M))),
    ):
        g = sym.sample(scale=1.0, generator=gen)
        q = TwistedQ.from_lie(Mk, sym)
        torch.testing.assert_close(q(params), q_m(params, (Mk,), sym))
        torch.testing.assert_close(q(sym.act(g, params)), q.transformed(g[0], sym)(params))
        # the flattened statement: Q_M(g theta) = theta^T (g_d^T M_d g_d) theta
        gd, Md = sym.action_matrix(g, params), sym.lie_matrix((Mk,), params)
        th = params.flatten()
        torch.testing.assert_close(q(sym.act(g, params)), th @ gd.T @ Md @ gd @ th)
    # orthogonal g in GL_h: Q_M(g theta) = Q_{g^T M g}(theta) literally
    gl = LinearSymmetry.for_activations(["identity"], [5])
    g = LinearSymmetry.for_activations(["radial"], [5]).sample(haar=True, generator=gen)[0]
    torch.testing.assert_close(q_m(gl.act((g,), params), (M,), gl), q_m(params, (g.T @ M @ g,), gl))
    # ... but not for a general (non-orthogonal) g
    g = gl.sample(scale=1.0, generator=gen)[0]
    assert abs(float(q_m(gl.act((g,), params), (M,), gl) - q_m(params, (g.T @ M @ g,), gl))) > 1e-3
    with pytest.raises(ValueError, match="one hidden layer"):
        TwistedQ.from_lie(M, LinearSymmetry.for_activations(["identity"] * 2, [5, 5]))


def test_orbit_scale_reaches_targets_exactly_or_explains_why_not():
    a = torch.tensor([1.0, 3.0, 0.5], dtype=F64)
    b = torch.tensor([2.0, 1.0, 0.7], dtype=F64)
    for alpha in (1.0, 2.0, 0.5):
        for t in (-1e4, -3.0, 0.0, 0.5, 7.0, 1e4):
            c = orbit_scale_for_target(a, b, t, alpha)
            q = a * c**2 - alpha * b * c ** (-2 * alpha)
            assert float((q - t).abs().max()) <= 1e-12 * max(1.0, abs(t))
    c = orbit_scale_for_target(a, b, 5.0, -1.0)  # radial map of Prop. G.2: Q = c^2 (a + b)
    torch.testing.assert_close(c, torch.sqrt(5.0 / (a + b)))
    with pytest.raises(ValueError, match=r"unreachable.*\(0, inf\)"):
        orbit_scale_for_target(a, b, -1.0, -1.0)
    with pytest.raises(ValueError, match=r"entry 1: reachable values lie in \(0, inf\)"):
        orbit_scale_for_target(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]), -1.0)
    assert math.isclose(float(orbit_scale_for_target(torch.tensor(0.0), torch.tensor(0.0), 0.0)), 1.0)
