"""Numerical checks of symmetries and conserved quantities, for tests and for users (e3nn style).

Each ``*_error`` function returns a non-negative float (0 for an exact identity); each
``assert_*`` function compares it with a tolerance taken from :data:`TOLERANCES` by dtype,
unless one is given, and raises ``AssertionError`` with the measured error otherwise.

* :func:`invariance_error` / :func:`assert_invariant` — F_{g·θ}(x) = F_θ(x) for random g
  (Definition 3.1, Proposition C.1) on a module or a functional stack.
* :func:`group_axiom_errors` / :func:`assert_group_axioms` — identity, composition, inverse,
  π a homomorphism, d/dt exp(tM)·θ = M·θ at t = 0 (eqs. 20, 22, 23) and closure of the Lie
  algebra under the bracket (:func:`lie_closure_error`).
* :func:`orthogonality_error` — ⟨∇L, M·θ⟩ = 0 for every Lie-algebra basis element (Prop. 3.4).
* :func:`conservation_error` / :func:`assert_conserved` — a quantity sampled along a
  trajectory stays at its initial value.

Check identities in float64; float32 tolerances are for smoke tests of trained models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .symmetry.groups import HiddenGroup
from .symmetry.linear import LinearSymmetry, stack_forward, transform_module
from .symmetry.stack import StackParams

__all__ = [
    "TOLERANCES",
    "tolerance",
    "invariance_error",
    "assert_invariant",
    "group_axiom_errors",
    "assert_group_axioms",
    "lie_closure_error",
    "orthogonality_error",
    "conservation_error",
    "assert_conserved",
]

#: Default tolerance of each check, by dtype (relative errors; see each function).
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


def tolerance(dtype: torch.dtype) -> float:
    """The default tolerance for ``dtype`` (:data:`TOLERANCES`)."""
    if dtype not in TOLERANCES:
        raise ValueError(
            f"no default tolerance for dtype {dtype}; expected one of {list(TOLERANCES)}"
        )
    return TOLERANCES[dtype]


def _relative(diff: torch.Tensor, ref: torch.Tensor) -> float:
    """max|diff| / max(1, max|ref|)."""
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    return float(diff.abs().max()) / scale if diff.numel() else 0.0


def invariance_error(
    model: nn.Module | StackParams,
    x: torch.Tensor,
    symmetry: LinearSymmetry | None = None,
    *,
    activations: Sequence[nn.Module] | None = None,
    ntrials: int = 3,
    scale: float = 0.5,
    generator: torch.Generator | None = None,
    elements: Sequence[Sequence[torch.Tensor]] | None = None,
) -> float:
    """max over random g of max|F_{g·θ}(x) − F_θ(x)| / max(1, max|F_θ(x)|).

    Args:
        model: a SymModel/SymHead/MLP module (transformed as a copy), or a :class:`StackParams`
            together with ``activations``.
        x: a batch of inputs of the model's dtype.
        symmetry: the group; default the one determined by the activations.
        activations: σ_1 … σ_{L−1} when ``model`` is a StackParams.
        ntrials: random group elements to try (ignored when ``elements`` is given).
        scale: spread of the sampled elements around the identity.
        generator: torch RNG.
        elements: explicit group elements to check instead of random ones.
    """
    if isinstance(model, StackParams):
        if activations is None:
            raise ValueError("activations are required when model is a StackParams")
        sym = symmetry or LinearSymmetry.for_activations(list(activations), model.hidden_widths)
        before = stack_forward(model, activations, x)

        def after(g: Sequence[torch.Tensor]) -> torch.Tensor:
            return stack_forward(sym.act(g, model), activations, x)

        dtype = model.dtype
    else:
        sym = symmetry or LinearSymmetry.for_module(model)
        with torch.no_grad():
            before = model(x)

        def after(g: Sequence[torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                return transform_module(model, g, sym)(x)

        dtype = x.dtype
    if elements is None:
        elements = [
            sym.sample(scale=scale, generator=generator, dtype=torch.float64)
            for _ in range(ntrials)
        ]
    errors = [_relative(after([gi.to(dtype) for gi in g]) - before, before) for g in elements]
    return max(errors) if errors else 0.0


def assert_invariant(
    model: nn.Module | StackParams, x: torch.Tensor, *, tol: float | None = None, **kwargs
) -> float:
    """Assert :func:`invariance_error` ≤ ``tol`` (default from :data:`TOLERANCES` for x's dtype)."""
    err = invariance_error(model, x, **kwargs)
    tol = tolerance(x.dtype) if tol is None else tol
    if not err <= tol:
        raise AssertionError(
            f"network function changed under the group action: error {err:.3e} > tol {tol:.1e}"
        )
    return err


def group_axiom_errors(
    symmetry: LinearSymmetry,
    params: StackParams,
    *,
    scale: float = 0.5,
    generator: torch.Generator | None = None,
    step: float = 1e-5,
) -> dict[str, float]:
    """Relative errors of the group-action axioms at θ for random g₁, g₂ and M.

    Returns:
        ``identity``: id·θ = θ; ``composition``: g₁·(g₂·θ) = (g₁g₂)·θ; ``inverse``:
        g⁻¹·(g·θ) = θ; ``membership``: sampled elements lie in G; ``homomorphism``:
        π(g₁g₂) = π(g₁)π(g₂); ``infinitesimal``: (exp(tM)·θ − exp(−tM)·θ)/2t = M·θ (central
        difference, error O(t²)); ``linear``: M·θ is linear in M; ``lie_closed``: the Lie
        algebra of each hidden group is closed under the bracket, P([M, N]) = [M, N] for its
        basis elements and for the random M, N (:func:`lie_closure_error`).
    """
    kw = {"scale": scale, "generator": generator, "dtype": params.dtype}
    g1, g2 = symmetry.sample(**kw), symmetry.sample(**kw)
    flat = params.flatten()

    def rel(a: StackParams, b: StackParams) -> float:
        return _relative(a.flatten() - b.flatten(), flat)

    errors = {
        "identity": rel(symmetry.act(symmetry.identity(params.dtype), params), params),
        "composition": rel(
            symmetry.act(g1, symmetry.act(g2, params)),
            symmetry.act(symmetry.compose(g1, g2), params),
        ),
        "inverse": rel(symmetry.act(symmetry.inverse(g1), symmetry.act(g1, params)), params),
        "membership": max(symmetry.membership_error(g1), symmetry.membership_error(g2)),
    }
    hom = 0.0
    for grp, a, b in zip(symmetry.groups, g1, g2, strict=True):
        hom = max(hom, _relative(grp.pi(a @ b) - grp.pi(a) @ grp.pi(b), grp.pi(a @ b)))
    errors["homomorphism"] = hom
    M = symmetry.random_lie(scale=1.0, generator=generator, dtype=params.dtype)
    N = symmetry.random_lie(scale=1.0, generator=generator, dtype=params.dtype)
    plus = symmetry.act(symmetry.exp([step * m for m in M]), params)
    minus = symmetry.act(symmetry.exp([-step * m for m in M]), params)
    fd = (plus - minus) * (0.5 / step)
    errors["infinitesimal"] = rel(fd, symmetry.infinitesimal(M, params))
    lin = symmetry.infinitesimal([2.0 * m + n for m, n in zip(M, N, strict=True)], params)
    errors["linear"] = rel(
        lin, symmetry.infinitesimal(M, params) * 2.0 + symmetry.infinitesimal(N, params)
    )
    errors["lie_closed"] = max(
        (lie_closure_error(grp, extra=(m, n)) for grp, m, n in zip(symmetry.groups, M, N, strict=True)),
        default=0.0,
    )
    return errors


def lie_closure_error(
    group: HiddenGroup, *, max_basis: int = 64, extra: Sequence[torch.Tensor] = ()
) -> float:
    """How far the Lie algebra of ``group`` is from being closed under the bracket.

    With P = ``group.project`` (the projection onto 𝔤) and E_a its basis elements
    (:meth:`HiddenGroup.lie_basis`), returns the largest relative residual of

    * P(E_a) = E_a (the basis lies in 𝔤), and
    * P([E_a, E_b]) = [E_a, E_b] for every pair a, b (𝔤 is closed: [𝔤, 𝔤] ⊆ 𝔤),

    each relative to max(1, max|·|). The pairs ``extra`` (e.g. random elements of 𝔤) are
    bracketed with each other as well. When 𝔤 has more than ``max_basis`` basis elements an
    evenly spaced subset of that many is used (deterministic; no random numbers are drawn).

    Returns:
        0 for a closed algebra, up to rounding.
    """
    dim = group.dim
    indices = None if dim <= max_basis else torch.linspace(0, dim - 1, max_basis).round().long().unique()
    B = group.lie_basis(indices=indices)
    X = torch.cat([B, *(torch.as_tensor(x, dtype=B.dtype).unsqueeze(0) for x in extra)])

    def residual(Y: torch.Tensor) -> float:  # max over Y of max|P(Y_i) − Y_i| / max(1, max|Y_i|)
        if not Y.numel():
            return 0.0
        num = (group.project(Y) - Y).abs().amax((-2, -1))
        return float((num / Y.abs().amax((-2, -1)).clamp_min(1.0)).max())

    err = residual(B)
    for A in X:
        err = max(err, residual(A @ X - X @ A))  # [A, Y] for every Y
    return err


def assert_group_axioms(
    symmetry: LinearSymmetry, params: StackParams, *, tol: float | None = None, **kwargs
) -> dict[str, float]:
    """Assert every :func:`group_axiom_errors` entry ≤ tol (``infinitesimal``: ≤ √tol, O(t²))."""
    errors = group_axiom_errors(symmetry, params, **kwargs)
    tol = tolerance(params.dtype) if tol is None else tol
    bad = {k: v for k, v in errors.items() if not v <= (tol**0.5 if k == "infinitesimal" else tol)}
    if bad:
        raise AssertionError(f"group axioms violated beyond tol {tol:.1e}: {bad}")
    return errors


def orthogonality_error(symmetry: LinearSymmetry, params: StackParams, grad: StackParams) -> float:
    """max_k |⟨∇L, E_k·θ⟩| / (‖∇L‖·‖E_k·θ‖) over a Lie-algebra basis (Proposition 3.4)."""
    T = symmetry.tangent_vectors(params)
    g = grad.flatten()
    norms = torch.linalg.vector_norm(T, dim=1) * torch.linalg.vector_norm(g)
    ok = norms > 0
    if not bool(ok.any()):
        return 0.0
    return float(((T @ g)[ok] / norms[ok]).abs().max())


def conservation_error(
    values: torch.Tensor | Sequence[torch.Tensor], scale: float | None = None
) -> float:
    """max_t |Q_t − Q_0| / max(1, |Q_0|) over a trajectory of (possibly tensor-valued) Q.

    Args:
        values: Q at successive times, stacked along dim 0 (or a sequence of tensors).
        scale: normalizer instead of max(1, max|Q_0|).
    """
    v = (
        values
        if isinstance(values, torch.Tensor)
        else torch.stack([torch.as_tensor(q) for q in values])
    )
    if v.shape[0] < 2:
        return 0.0
    diff = (v[1:] - v[:1]).abs().max()
    denom = scale if scale is not None else max(1.0, float(v[0].abs().max()))
    return float(diff) / denom


def assert_conserved(
    values: torch.Tensor | Sequence[torch.Tensor],
    *,
    tol: float | None = None,
    scale: float | None = None,
    name: str = "Q",
) -> float:
    """Assert :func:`conservation_error` ≤ tol (default from the dtype of ``values``)."""
    err = conservation_error(values, scale)
    if tol is None:
        first = values[0] if not isinstance(values, torch.Tensor) else values
        tol = tolerance(torch.as_tensor(first).dtype)
    if not err <= tol:
        raise AssertionError(f"{name} not conserved: relative drift {err:.3e} > tol {tol:.1e}")
    return err
