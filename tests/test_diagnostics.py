"""Q diagnostics on tiny settings: dynamics, distribution, convergence, Hessian, teleport."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from symensemble.diagnostics import (
    QRecorder,
    convergence_elementwise,
    convergence_radial,
    expected_q,
    hessian_study,
    hutchinson_trace,
    hvp_fn,
    inspect_model,
    lanczos,
    one_dimensional_example,
    q_controlled_init,
    q_distribution,
    q_dynamics,
    sample_q,
    teleport,
)
from symensemble.diagnostics.common import (
    TwoLayerProblem,
    dsigma,
    log_spaced_steps,
    sigma_derivatives,
)
from symensemble.diagnostics.curvature import (
    flattest_scales,
    head_hessian_trace,
    head_top_eigenvalue,
    reduce_features,
)
from symensemble.diagnostics.distribution import expected_antiderivative
from symensemble.diagnostics.hessian import full_hessian
from symensemble.diagnostics.teleport import scale_params, unit_scales_for_q
from symensemble.io import to_jsonable
from symensemble.models import create_model
from symensemble.symmetry.activations import create_activation
from symensemble.symmetry.conserved import homogeneous_q
from symensemble.symmetry.elementwise import elementwise_q
from symensemble.symmetry.linear import stack_forward
from symensemble.symmetry.module_bridge import stack_params
from symensemble.symmetry.stack import StackParams

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_layer_gradients_match_autograd():
    gen = torch.Generator().manual_seed(0)
    for act in ("identity", "relu", "leaky_relu", "tanh", "sigmoid", "relu_sqr"):
        for red in ("mean", "sum", "half"):
            prob = TwoLayerProblem(torch.randn(3, 4, generator=gen, dtype=F64), act, red)
            U = torch.randn(2, 3, 5, generator=gen, dtype=F64, requires_grad=True)
            V = torch.randn(2, 5, 4, generator=gen, dtype=F64, requires_grad=True)
            loss, gU, gV = prob.loss_and_grads(U, V)
            aU, aV = torch.autograd.grad(prob.loss(U, V).sum(), (U, V))
            torch.testing.assert_close(gU, aU)
            torch.testing.assert_close(gV, aV)


def test_q_dynamics_prop_e1_and_small_drift():
    res = q_dynamics(("identity", "tanh"), (0.1, 0.01), steps=400, h=12, num_records=50)
    lin = res["results"]["identity"]
    assert lin["prop_e1"]["holds"] and lin["prop_e1"]["violations"] == [0, 0]
    assert max(lin["prop_e1"]["max_ratio"]) <= 1.0
    assert max(lin["prop_e1"]["max_identity_error"]) < 1e-6
    for name in ("identity", "tanh"):
        r = res["results"][name]
        assert max(r["max_abs_dQ_tilde"]) < 0.01
        assert r["steps"][0] == 0 and r["steps"][-1] == 400
        # one gradient step changes Q by O(lr^2) (App. E): Delta Q~(1) scales as lr^2, 100x here
        assert r["steps"][1] == 1
        d_big, d_small = (row[1] for row in r["dQ_tilde"])
        assert d_small != 0 and math.isclose(d_big / d_small, (0.1 / 0.01) ** 2, rel_tol=1e-3)
        assert len(r["loss"]) == 2 and len(r["loss"][0]) == len(r["steps"])
    assert res["checks"]["grows_with_lr"] == {"identity": True, "tanh": True}
    json.dumps(to_jsonable(res))


def test_distribution_means_and_expectations():
    assert math.isclose(expected_q("identity", 7, 3, 5, "xavier"), 7 - 3, abs_tol=1e-12)
    assert math.isclose(expected_q("identity", 7, 3, 5, "kaiming"), 2 * (7 - 3), abs_tol=1e-12)
    for var in (0.01, 0.3):  # closed forms of E[F(z)], z ~ N(0, var)
        assert math.isclose(expected_antiderivative("tanh", var), (math.exp(2 * var) - 1) / 4, rel_tol=1e-10)
        assert math.isclose(expected_antiderivative("sigmoid", var), math.exp(var / 2) - 1, rel_tol=1e-10)
        assert math.isclose(expected_antiderivative("relu", var), var / 4, rel_tol=1e-10)
    q = sample_q("identity", 6, 4, 5, samples=10, generator=torch.Generator().manual_seed(0), chunk=3)
    assert q.shape == (10,)
    res = q_distribution(
        [(20, 30, 10, "identity"), (20, 20, 20, "tanh")], ("xavier", "glorot"), samples=300, seed=1
    )
    assert res["checks"]["all_within_3se"], [r["z"] for r in res["results"]]
    first = res["results"][0]
    assert first["paper_m_minus_h"] == -10 and math.isclose(first["expected"], -10)
    with pytest.raises(ValueError, match="unknown init"):
        q_distribution(inits=("uniform",), samples=10)


def test_q_controlled_init_on_orbit_and_by_rescaling():
    gen = torch.Generator().manual_seed(2)
    U = torch.randn(3, 6, generator=gen, dtype=F64) * 0.3
    V = torch.randn(6, 4, generator=gen, dtype=F64) * 0.3
    for act in ("identity", "relu", "leaky_relu"):
        for target in (-5.0, 0.0, 3.0):
            U2, V2, method = q_controlled_init(U, V, act, target)
            assert method == "orbit"
            assert abs(float(elementwise_q(U2, V2, act)) - target) < 1e-12
            a = create_activation(act)
            torch.testing.assert_close(U2 @ a(V2), U @ a(V))  # same function
    U2, V2, method = q_controlled_init(U, V, "tanh", 2.0)
    assert method == "rescale_U" and abs(float(elementwise_q(U2, V2, "tanh")) - 2.0) < 1e-12
    with pytest.raises(ValueError, match="unreachable for 'sigmoid' by rescaling U"):
        q_controlled_init(U, V, "sigmoid", -100.0)
    Vneg = -V.abs()  # all ReLU units off: Q = f1/c^2 > 0 only
    with pytest.raises(ValueError, match="unreachable along the relu orbit"):
        q_controlled_init(U, Vneg, "relu", -1.0)


def test_convergence_elementwise_same_start_different_q():
    res = convergence_elementwise(
        ("identity", "tanh"), (-20.0, 0.0, 5.0), lr=0.02, steps=1500, h=10, num_records=60
    )
    lin = res["results"]["identity"]
    assert lin["method"] == ["orbit"] * 3 and res["checks"]["identity"]["same_initial_loss"]
    torch.testing.assert_close(torch.tensor(lin["Q0"], dtype=F64), torch.tensor([-20.0, 0.0, 5.0], dtype=F64))
    assert all(f < i for f, i in zip(lin["final_loss"], lin["initial_loss"], strict=True))
    assert "-20.0" in res["results"]["tanh"]["skipped"]  # below -f2(V): unreachable by rescaling U
    with pytest.raises(ValueError, match="no target Q"):
        convergence_elementwise(("sigmoid",), (-1e3,), steps=2)


def test_convergence_radial_prop_g2_steps_proportional_to_q():
    res = convergence_radial((0.5, 1.0, 2.0), lr=1e-4, steps=4000, num_records=120)
    r, checks = res["results"], res["checks"]
    assert checks["smaller_Q_faster"] and checks["same_initial_loss"] and checks["lambda_conserved"]
    assert checks["prop_g3_bound_holds"], r["g3_max_ratio"]
    per_q = r["steps_per_Q"]
    assert max(per_q) - min(per_q) <= 0.1 * max(per_q)  # time rescales exactly with lambda
    with pytest.raises(ValueError, match="must be > 0"):
        convergence_radial((0.0, 1.0), steps=2)


def test_lanczos_and_hutchinson_against_dense():
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(40, 40, generator=gen, dtype=F64)
    A = A @ A.T / 40
    ev = torch.linalg.eigvalsh(A)
    ritz = lanczos(lambda v: A @ v, 40, 40, generator=gen)
    torch.testing.assert_close(ritz[-3:], ev[-3:], rtol=1e-10, atol=1e-10)
    tr, se = hutchinson_trace(lambda v: A @ v, 40, 64, generator=gen)
    assert abs(tr - float(ev.sum())) < 5 * se + 1e-9

    def f(x):
        return (x**4).sum() + x[0] * x[1]

    x = torch.randn(5, generator=gen, dtype=F64)
    v = torch.randn(5, generator=gen, dtype=F64)
    torch.testing.assert_close(hvp_fn(f, x)(v), full_hessian(f, x) @ v)


def test_hessian_near_zero_count_equals_orbit_dimension_for_linear_network():
    res = hessian_study(("identity", "relu"), (0.3, 0.8), m=3, n=2, h=6, lr=0.05, steps=3000)
    for run in res["results"]["identity"]["runs"]:
        assert run["final_loss"] < 1e-10
        assert run["near_zero"] == run["orbit_dim"] == run["orbit_dim_formula"] == 6 * 5 - 6
        assert run["negative"] == 0
    assert res["results"]["identity"]["runs"][0]["lanczos_check_top5_abs_err"] < 1e-8
    assert res["checks"]["linear_near_zero_equals_orbit_dim"]
    relu = res["results"]["relu"]["runs"]
    assert all(r["orbit_dim"] == 6 for r in relu)
    lz = hessian_study(("identity",), (0.5,), m=3, n=2, h=6, steps=50, method="lanczos")
    assert lz["results"]["identity"]["runs"][0]["near_zero"] is None


def test_one_dimensional_example_eq83():
    res = one_dimensional_example((-3.0, 0.0, 2.0))
    assert res["max_abs_err"] < 1e-8
    for row in res["rows"]:
        assert abs(row["UV"] - 1) < 1e-10 and abs(row["Q_reached"] - row["Q"]) < 1e-8
        assert math.isclose(row["eig_half_loss"][1], math.sqrt(row["Q_reached"] ** 2 + 4), rel_tol=1e-9)
        assert math.isclose(row["eig_plain_loss"][1], 2 * math.sqrt(row["Q_reached"] ** 2 + 4), rel_tol=1e-9)


# --------------------------------------------------------------------------------------------
# heads: inspection, teleport, callback
# --------------------------------------------------------------------------------------------


def _small_model(act="leaky_relu", hidden=5, seed=0):
    torch.manual_seed(seed)
    return create_model("paper_cnn", hidden=hidden, channels=2, act=act).eval()


def test_sigma_derivatives_closed_forms_and_autograd_fallback():
    z = torch.linspace(-2.0, 2.0, 11, dtype=F64)
    for name in ("identity", "relu", "leaky_relu", "tanh", "sigmoid", "relu_sqr"):
        act = create_activation(name)
        x = z.clone().requires_grad_(True)
        (d1,) = torch.autograd.grad(act(x).sum(), x, create_graph=True)
        d2 = torch.autograd.grad(d1.sum(), x, allow_unused=True)[0] if d1.requires_grad else None
        s, ds, dds = sigma_derivatives(act, z)
        torch.testing.assert_close(s, act(z))
        torch.testing.assert_close(ds, d1.detach())
        torch.testing.assert_close(ds, dsigma(act, z))
        torch.testing.assert_close(dds, torch.zeros_like(z) if d2 is None else d2)
        assert not (s.requires_grad or ds.requires_grad or dds.requires_grad)
    with pytest.raises(ValueError, match="pointwise"):
        dsigma(create_activation("radial"), z.view(1, -1))


def _trace_checked_against_dense(act, shape, n, gen):
    """A random head of ``shape``, n inputs and labels, after asserting that the exact head
    Hessian trace equals the trace of the dense Hessian of the cross-entropy."""
    params = StackParams.random(shape, generator=gen)
    X = torch.randn(n, shape[0], generator=gen, dtype=F64)
    y = torch.randint(0, shape[-1], (n,), generator=gen)

    def loss(flat):
        return F.cross_entropy(stack_forward(params.unflatten(flat), [act], X), y)

    H = full_hessian(loss, params.flatten())
    assert math.isclose(head_hessian_trace(params, act, X, y), float(H.trace()), rel_tol=1e-10)
    return params, X, y


def test_exact_head_hessian_trace_for_curved_activations():
    gen = torch.Generator().manual_seed(5)
    for act_name in ("sigmoid", "relu_sqr"):  # sigma'' != 0; relu_sqr takes the autograd path
        _trace_checked_against_dense(create_activation(act_name), (6, 3, 3), 12, gen)


def test_exact_head_hessian_trace_matches_dense_and_scales_as_predicted():
    gen = torch.Generator().manual_seed(4)
    for act_name in ("leaky_relu", "identity", "tanh"):
        act = create_activation(act_name)
        params, X, y = _trace_checked_against_dense(act, (7, 4, 3), 15, gen)
        small, Xs = reduce_features(params, X[:5])
        assert Xs.shape == (5, 5)
        assert math.isclose(
            head_hessian_trace(small, act, Xs, y[:5]),
            head_hessian_trace(params, act, X[:5], y[:5]),
            rel_tol=1e-10,
        )
    act = create_activation("leaky_relu")
    c, info = flattest_scales(params, act, 1.0, X, y, objective="trace")
    moved = scale_params(params, c, 1.0)
    assert math.isclose(head_hessian_trace(moved, act, X, y), info["trace_after"], rel_tol=1e-10)
    assert info["trace_after"] <= info["trace_before"]
    for k in range(4):  # a minimum along every unit's scale
        for f in (0.9, 1.1):
            c2 = c.clone()
            c2[k] *= f
            assert head_hessian_trace(scale_params(params, c2, 1.0), act, X, y) >= info["trace_after"]
    top0 = head_top_eigenvalue(params, act, X, y, iters=40)
    assert math.isclose(
        top0,
        float(
            torch.linalg.eigvalsh(
                full_hessian(
                    lambda f: F.cross_entropy(stack_forward(params.unflatten(f), [act], X), y),
                    params.flatten(),
                )
            )[-1]
        ),
        rel_tol=1e-8,
    )
    c, info = flattest_scales(params, act, 1.0, X, y, objective="top", max_evals=12, iters=30)
    assert info["top_after"] <= info["top_before"] + 1e-12 and info["evaluations"] <= 12


def test_teleport_targets_exact_and_function_unchanged():
    model = _small_model()
    x = torch.rand(6, 3, 32, 32)
    out = model(x)
    params = stack_params(model)
    q0 = homogeneous_q(params)[0]
    new, rep = teleport(model, total=-3.5)
    assert abs(rep["Q_total_after"] + 3.5) < 1e-4 and rep["target_abs_error"] < 1e-4
    torch.testing.assert_close(new(x), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stack_params(model).flatten(), params.flatten())  # original untouched
    targets = (q0 + torch.linspace(-1, 1, 5, dtype=F64)).tolist()
    new, rep = teleport(model, per_unit=targets)
    assert rep["target_abs_error"] < 1e-4
    torch.testing.assert_close(new(x), out, rtol=1e-5, atol=1e-5)
    c = unit_scales_for_q(params, 1.0, per_unit=targets)
    torch.testing.assert_close(
        homogeneous_q(scale_params(params, c, 1.0))[0], torch.tensor(targets, dtype=F64)
    )
    # a unit with no incoming weights or bias has Q_k = -|U_k|^2 < 0 whatever c is
    with torch.no_grad():
        model.head.V.weight[2] = 0
        model.head.V.bias[2] = 0
    with pytest.raises(ValueError, match=r"entry 2: reachable values lie in \(-inf, 0\)"):
        teleport(model, per_unit=[1.0] * 5)
    with pytest.raises(ValueError, match="one per hidden unit"):
        teleport(model, per_unit=[1.0] * 3)
    with pytest.raises(ValueError, match="exactly one"):
        teleport(model, total=1.0, flattest="trace")
    with pytest.raises(ValueError, match="needs features"):
        teleport(model, flattest="trace")


@pytest.mark.parametrize("act,match", [("tanh", "no continuous linear symmetry"), ("radial", "isometries")])
def test_teleport_refuses_heads_without_a_usable_orbit(act, match):
    with pytest.raises(ValueError, match=match):
        teleport(_small_model(act), total=1.0)


def test_inspect_and_q_recorder():
    model = _small_model()
    info = inspect_model(model)
    layer = info["layers"][0]
    assert info["symmetry"]["orbit_dim"] == info["symmetry"]["orbit_dim_formula"] == 5
    assert layer["conserved"] and len(layer["per_unit"]) == 5
    lin = inspect_model(_small_model("identity"))
    assert len(lin["layers"][0]["matrix"]) == 5 and lin["symmetry"]["group"] == "GL(5)"
    sig = inspect_model(_small_model("sigmoid"))
    assert sig["symmetry"]["group"] is None and not sig["layers"][0]["conserved"]
    rec = QRecorder()
    metrics: dict = {}
    rec(model, 0, metrics)
    with torch.no_grad():
        model.head.U.weight.mul_(2)
    rec(model, 1, metrics)
    assert metrics["q"]["drift"] < 0 and len(metrics["q"]["per_unit"]) == 5
    assert len(rec.history) == 2
    json.dumps(metrics)
    # a resumed run continues the drift from the original first total
    first = rec.history[0][1]["total"]
    resumed = QRecorder(baseline=first)
    again: dict = {}
    resumed(model, 2, again)
    assert again["q"]["drift"] == pytest.approx(metrics["q"]["drift"]) and again["q"]["drift"] < 0
    assert QRecorder()(model, 2, again) is None and again["q"]["drift"] == 0
    with pytest.raises(ValueError, match="finite"):
        QRecorder(baseline=float("nan"))


def test_log_spaced_steps():
    s = log_spaced_steps(100_000, 50)
    assert s[0] == 0 and s[-1] == 100_000 and s == sorted(set(s)) and len(s) <= 50
    assert log_spaced_steps(5, 50) == [0, 1, 2, 3, 4, 5]
