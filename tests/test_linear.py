"""Linear symmetries (eqs. 22-23): invariance, group axioms, Prop. 3.4, orbit dimensions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from symensemble.models import create_model
from symensemble.symmetry.activations import create_activation
from symensemble.symmetry.groups import HiddenGroup
from symensemble.symmetry.linear import LinearSymmetry, stack_forward, transform_module
from symensemble.symmetry.module_bridge import module_layers, stack_params
from symensemble.symmetry.orbits import orbit_dimension_formula, paper_orbit_dimension
from symensemble.symmetry.stack import StackParams
from symensemble.testing import (
    assert_group_axioms,
    assert_invariant,
    group_axiom_errors,
    invariance_error,
    lie_closure_error,
    orthogonality_error,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# (activation name, kwargs) with a continuous linear symmetry
SYMMETRIC = [
    ("identity", {}),
    ("relu", {}),
    ("leaky_relu", {"negative_slope": 0.1}),
    ("radial", {"profile": "tanh"}),
    ("radial", {"profile": "shifted_relu", "shift": 0.3}),
]
STACKS = [((5, 7, 3), True), ((4, 6, 5, 2), True), ((3, 4, 2), False)]


def _acts(name, kw, n):
    return [create_activation(name, **kw) for _ in range(n)]


def _mse_grad(params, acts, x, y):
    p = params.requires_grad_()
    loss = (stack_forward(p, acts, x) - y).square().mean()
    return p.with_tensors(torch.autograd.grad(loss, p.tensors()))


@pytest.mark.parametrize("name,kw", SYMMETRIC, ids=[f"{n}{k.get('profile', '')}" for n, k in SYMMETRIC])
@pytest.mark.parametrize("widths,bias", STACKS, ids=["2layer", "3layer", "nobias"])
def test_action_leaves_function_unchanged_and_is_a_group_action(name, kw, widths, bias):
    gen = torch.Generator().manual_seed(0)
    params = StackParams.random(widths, bias=bias, generator=gen)
    acts = _acts(name, kw, len(widths) - 2)
    sym = LinearSymmetry.for_activations(acts, params.hidden_widths)
    x = torch.randn(32, widths[0], generator=gen, dtype=F64)
    assert_invariant(params, x, activations=acts, symmetry=sym, generator=gen, ntrials=4, tol=1e-10)
    errors = assert_group_axioms(sym, params, generator=gen, tol=1e-10)
    assert errors["infinitesimal"] < 1e-8
    # Proposition 3.4: the gradient is orthogonal to every infinitesimal symmetry direction
    grad = _mse_grad(params, acts, x, torch.randn(32, widths[-1], generator=gen, dtype=F64))
    assert orthogonality_error(sym, params, grad) < 1e-10


def test_large_group_elements_and_haar_orthogonal():
    gen = torch.Generator().manual_seed(1)
    params = StackParams.random((4, 6, 3), generator=gen)
    x = torch.randn(16, 4, generator=gen, dtype=F64)
    for name in ("identity", "leaky_relu"):
        acts = [create_activation(name)]
        assert invariance_error(params, x, activations=acts, scale=2.0, generator=gen) < 1e-10
    acts = [create_activation("radial")]
    sym = LinearSymmetry.for_activations(acts, [6])
    dets = set()
    for _ in range(8):
        g = sym.sample(haar=True, generator=gen)
        assert sym.membership_error(g) < 1e-12
        dets.add(round(float(torch.linalg.det(g[0]))))
        assert invariance_error(params, x, activations=acts, elements=[g]) < 1e-10
    assert dets == {-1, 1}  # both components of O(h)


def test_tangent_vectors_match_infinitesimal_action_and_lie_matrix():
    gen = torch.Generator().manual_seed(2)
    params = StackParams.random((3, 4, 5, 2), generator=gen)
    for sym in (
        LinearSymmetry.for_activations(["identity", "relu"], [4, 5]),
        LinearSymmetry((HiddenGroup("orthogonal", 4), HiddenGroup("scaling", 5, alpha=2.0))),
    ):
        T = sym.tangent_vectors(params)
        assert T.shape == (sym.dim, params.numel)
        rows = []
        for i, grp in enumerate(sym.groups):
            for E in grp.lie_basis():
                M = [torch.zeros(w, w, dtype=F64) for w in sym.hidden_widths]
                M[i] = E
                rows.append(sym.infinitesimal(M, params).flatten())
        torch.testing.assert_close(T, torch.stack(rows), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="method='gram'"):
        sym.tangent_vectors(params, max_entries=10)
    sym = LinearSymmetry.for_activations(["identity", "relu"], [4, 5])
    M = sym.random_lie(generator=gen)
    lie = sym.lie_matrix(M, params)
    torch.testing.assert_close(lie @ params.flatten(), sym.infinitesimal(M, params).flatten())
    g = sym.sample(generator=gen)
    A = sym.action_matrix(g, params)
    torch.testing.assert_close(A @ params.flatten(), sym.act(g, params).flatten())


def test_modules_headmodel_and_mlp_copy_and_inplace():
    torch.manual_seed(0)
    model = create_model("paper_cnn", hidden=6, channels=2).double().eval()
    x = torch.rand(4, 3, 32, 32, dtype=F64)
    sym = LinearSymmetry.for_module(model)
    assert sym.groups[0] == HiddenGroup("scaling", 6, 1.0)
    before = [p.clone() for p in model.parameters()]
    assert_invariant(model, x, ntrials=2, tol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    g = sym.sample(scale=1.0)
    out = model(x)
    same = transform_module(model, g, inplace=True)
    assert same is model
    assert not torch.equal(model.head.V.weight, before[-4])
    torch.testing.assert_close(model(x), out, rtol=1e-12, atol=1e-12)

    mlp = nn.Sequential(
        nn.Linear(5, 8), nn.LeakyReLU(0.2), nn.Linear(8, 6), nn.Identity(), nn.Linear(6, 3)
    ).double()
    linears, acts = module_layers(mlp)
    assert [a.name for a in acts] == ["leaky_relu", "identity"]
    sym = LinearSymmetry.for_module(mlp)
    assert [grp.kind for grp in sym.groups] == ["scaling", "gl"]
    assert_invariant(mlp, torch.randn(10, 5, dtype=F64), ntrials=3, tol=1e-12)
    assert stack_params(mlp).widths == (5, 8, 6, 3)


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "relu_sqr"])
def test_activation_without_continuous_symmetry_is_refused(name):
    with pytest.raises(ValueError, match=rf"'{name}' has no continuous linear symmetry"):
        LinearSymmetry.for_activations([name], [4])
    model = create_model("paper_cnn", hidden=4, channels=2, act=name)
    with pytest.raises(ValueError, match="nonlinear data-dependent action"):
        LinearSymmetry.for_module(model)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="not a symmetry of activation 'radial'"):
        LinearSymmetry.for_activations(["radial"], [4], kinds="scaling")
    assert (
        LinearSymmetry.for_activations(["identity"], [4], kinds="orthogonal").groups[0].kind == "orthogonal"
    )
    with pytest.raises(ValueError, match="cannot find a stack"):
        LinearSymmetry.for_module(nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="must be nn.Linear"):
        module_layers(nn.Sequential(nn.ReLU(), nn.Linear(3, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="not a known activation"):
        module_layers(nn.Sequential(nn.Linear(3, 3), nn.GELU(), nn.Linear(3, 3)))

    class NoSymHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, 3)

    with pytest.raises(ValueError, match="not a SymHead"):
        LinearSymmetry.for_module(NoSymHead())
    sym = LinearSymmetry.for_activations(["relu"], [4])
    with pytest.raises(ValueError, match="hidden widths"):
        sym.act(sym.identity(), StackParams.random((3, 5, 2)))
    with pytest.raises(ValueError, match=r"must be \(4, 4\)"):
        sym.act((torch.eye(3, dtype=F64),), StackParams.random((3, 4, 2)))
    with pytest.raises(ValueError, match="input columns"):
        StackParams((torch.zeros(4, 3), torch.zeros(2, 5)), (None, None))


ORBIT_CASES = [(1, 3, 1), (2, 6, 2), (4, 3, 2), (3, 8, 2), (10, 4, 3), (2, 5, 3), (5, 50, 10)]


@pytest.mark.parametrize("kind,act", [("gl", "identity"), ("scaling", "relu"), ("orthogonal", "radial")])
def test_orbit_dimension_formula_matches_numerical_rank(kind, act):
    gen = torch.Generator().manual_seed(3)
    sym_cache = {}
    for n, h, m in ORBIT_CASES:
        for bias in (False, True):
            params = StackParams.random((n, h, m), bias=bias, generator=gen)
            sym = sym_cache.setdefault(h, LinearSymmetry.for_activations([act], [h]))
            formula = orbit_dimension_formula(kind, n, h, m, bias=bias)
            assert sym.orbit_dimension(params, method="svd") == formula, (n, h, m, bias)
            assert sym.orbit_dimension(params, method="gram") == formula, (n, h, m, bias)
            if h <= max(n, m) and not bias:
                assert paper_orbit_dimension(kind, n, h, m) == formula
    # the paper's value for GL is the generic one everywhere; for the paper's Example (5, 50, 10)
    assert orbit_dimension_formula("gl", 5, 50, 10) == paper_orbit_dimension("gl", 5, 50, 10) == 700


def test_paper_table_differs_for_subgroups_when_h_exceeds_widths():
    # Theorem 3.3 / Cor. C.4 give max(n, m) and C(h,2) - C(h - max(n,m), 2); generic points have
    # trivial stabilizers in T+(h) and O(h - n - m) stabilizers in O(h).
    assert paper_orbit_dimension("scaling", 1, 3, 1) == 1 and orbit_dimension_formula("scaling", 1, 3, 1) == 3
    assert paper_orbit_dimension("orthogonal", 2, 6, 2) == 9
    assert orbit_dimension_formula("orthogonal", 2, 6, 2) == math.comb(6, 2) - math.comb(2, 2) == 14


def test_orbit_dimension_at_a_non_generic_point():
    gen = torch.Generator().manual_seed(4)
    params = StackParams.random((3, 5, 2), bias=False, generator=gen)
    V, U = (w.clone() for w in params.weights)
    V[1] = 0.0
    U[:, 1] = 0.0  # a dead unit: scaling it fixes theta, so T+(5) loses one orbit dimension
    dead = StackParams((V, U), (None, None))
    scaling = LinearSymmetry.for_activations(["relu"], [5])
    assert scaling.orbit_dimension(params) == 5
    assert scaling.orbit_dimension(dead, method="svd") == scaling.orbit_dimension(dead, method="gram") == 4
    gl = LinearSymmetry.for_activations(["identity"], [5])
    assert gl.orbit_dimension(dead, method="svd") == gl.orbit_dimension(dead, method="gram")


def test_lie_bases_and_group_membership():
    for kind, dim in (("gl", 16), ("scaling", 4), ("orthogonal", 6)):
        grp = HiddenGroup(kind, 4)
        B = grp.lie_basis()
        assert B.shape == (dim, 4, 4) == (grp.dim, 4, 4)
        assert torch.linalg.matrix_rank(B.reshape(dim, -1)) == dim
        torch.testing.assert_close(grp.project(B), B)
        g = grp.sample(generator=torch.Generator().manual_seed(0))
        assert grp.membership_error(g) < 1e-12
        torch.testing.assert_close(grp.inverse(g) @ g, torch.eye(4, dtype=F64))
    grp = HiddenGroup("scaling", 3, alpha=2.0)
    g = grp.sample(generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(grp.pi(g), g @ g)
    assert HiddenGroup("scaling", 3).membership_error(-torch.eye(3, dtype=F64)) == math.inf
    with pytest.raises(ValueError, match="unknown group kind"):
        HiddenGroup("affine", 3)


class _SymmetricSpan(HiddenGroup):
    """Symmetric matrices posing as a Lie algebra: a subspace, but [S, S'] is antisymmetric."""

    def project(self, A):
        return 0.5 * (A + A.transpose(-1, -2))

    def lie_basis(self, dtype=F64, device=None, *, indices=None):
        return super().lie_basis(dtype, device, indices=indices).abs()  # E_kl + E_lk


def test_lie_closure_error_is_zero_for_the_groups_and_catches_a_non_algebra():
    for kind in ("gl", "scaling", "orthogonal"):
        for h in (1, 2, 5, 12):  # GL(12) has 144 > 64 basis elements: the subset path
            grp = HiddenGroup(kind, h)
            M = grp.random_lie(generator=torch.Generator().manual_seed(h))
            assert lie_closure_error(grp, extra=(M, M.T if kind == "orthogonal" else 2 * M)) < 1e-15
    gl4, idx = HiddenGroup("gl", 4), torch.tensor([0, 5])
    torch.testing.assert_close(gl4.lie_basis(indices=idx), gl4.lie_basis()[idx])
    bad = _SymmetricSpan("orthogonal", 4)
    assert lie_closure_error(bad) > 0.4
    # ... and through the group axioms, where it is asserted
    sym = LinearSymmetry((bad,))
    params = StackParams.random((3, 4, 2), generator=torch.Generator().manual_seed(0))
    assert group_axiom_errors(sym, params)["lie_closed"] > 0.4
    with pytest.raises(AssertionError, match="lie_closed"):
        assert_group_axioms(sym, params)


def test_stack_params_is_the_one_layer_stack():
    gen = torch.Generator().manual_seed(5)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    params = StackParams.from_linears([mlp[0], mlp[2]])
    x = torch.randn(7, 3, generator=gen, dtype=F64)
    torch.testing.assert_close(params.forward(x, [torch.tanh]), mlp(x), atol=1e-14, rtol=0)
    torch.testing.assert_close(stack_forward(params, [torch.tanh], x), mlp(x), atol=1e-14, rtol=0)
    # two-layer head accessors, output activation, copying back into modules
    assert params.V is params.weights[0] and params.U is params.weights[1]
    assert params.b_V is params.biases[0] and params.b_U is params.biases[1]
    out = params.forward(x, [torch.tanh, torch.sigmoid])
    torch.testing.assert_close(out, torch.sigmoid(mlp(x)), atol=1e-14, rtol=0)
    other = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    params.copy_to([other[0], other[2]])
    torch.testing.assert_close(other(x), mlp(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="two-layer head"):
        _ = StackParams.random((3, 4, 4, 2)).U
    with pytest.raises(ValueError, match="hidden activations"):
        params.forward(x, [])
    # a batch of stacks (one per data point) evaluates as the loop over its members
    scale = torch.linspace(0.5, 1.5, 5, dtype=F64)
    batch = params.map(lambda t: scale.view(5, *([1] * t.ndim)) * t)  # weights (5, n_i, n_i-1)
    xb = torch.randn(5, 3, generator=gen, dtype=F64)
    member = [StackParams(tuple(W[k] for W in batch.weights), tuple(b[k] for b in batch.biases))
              for k in range(5)]
    expected = torch.stack([m.forward(xb[k], [torch.tanh]) for k, m in enumerate(member)])
    torch.testing.assert_close(batch.forward(xb, [torch.tanh]), expected, atol=1e-14, rtol=0)
    assert batch.widths == (3, 4, 2) and StackParams(params.weights).has_bias == (False, False)
