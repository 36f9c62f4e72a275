"""Orbit dimensions of the linear symmetry groups (Theorem 3.3, Proposition C.3, Corollary C.4).

* :func:`tangent_vectors` — the tangent space {E_k·θ} of an orbit G·θ (eq. 23), built by indexing;
* :func:`orbit_dimension` — its numerical rank (SVD), or for one hidden layer the closed-form
  spectrum of the Gram operator;
* :func:`orbit_dimension_formula` / :func:`paper_orbit_dimension` — the generic values and the
  paper's table for a two-layer network.

The functions take the symmetry as their first argument; :class:`~.linear.LinearSymmetry`
exposes them as methods.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .groups import KINDS, HiddenGroup
from .stack import StackParams

if TYPE_CHECKING:
    from .linear import LinearSymmetry

__all__ = ["tangent_vectors", "orbit_dimension", "orbit_dimension_formula", "paper_orbit_dimension"]

def tangent_vectors(symmetry: LinearSymmetry, params: StackParams, max_entries: float = 2e8) -> torch.Tensor:
    """The infinitesimal action of every Lie-algebra basis element, flattened (eq. 23).

    Row k is (E_k·θ).flatten() for the k-th basis element E_k of 𝔤 = 𝔤_1 × … × 𝔤_{L−1}
    (layer-1 basis first). The rows span the tangent space of the orbit G·θ.

    Built by indexing (the basis elements E_kl, E_kk or E_kl − E_lk are never materialized),
    so memory is that of the result; above ``max_entries`` it raises and points at
    ``orbit_dimension(method="gram")``.

    Shape:
        (dim G, d).
    """
    symmetry._check(params)
    size = symmetry.dim * params.numel
    if size > max_entries:
        raise ValueError(
            f"the tangent matrix would have {symmetry.dim} x {params.numel} = {size:.3g} entries "
            f"(> max_entries = {max_entries:.3g}); for one hidden layer use "
            "orbit_dimension(params, method='gram')"
        )
    offsets, pos = [], 0
    for t in params.tensors():
        offsets.append(pos)
        pos += t.numel()
    # offset of W_i and b_i in the flattened vector
    slot, k = [], 0
    for b in params.biases:
        slot.append((offsets[k], None if b is None else offsets[k + 1]))
        k += 1 if b is None else 2
    rows = [_layer_tangents(grp, params, i, slot, pos) for i, grp in enumerate(symmetry.groups)]
    return torch.cat(rows, dim=0)


def _layer_tangents(grp: HiddenGroup, params: StackParams, i: int,
                    slot: list[tuple[int, int | None]], d: int) -> torch.Tensor:
    """The (dim G_i, d) rows of :func:`tangent_vectors` for hidden layer i (0-based)."""
    k, l = grp.basis_indices(params.device)  # E_a = E_{k_a l_a} (− E_{l_a k_a} for 𝔰𝔬_h)
    D, a = k.numel(), torch.arange(k.numel(), device=params.device)
    W_in, b_in, W_out = params.weights[i], params.biases[i], params.weights[i + 1]
    c = grp.alpha if grp.kind == "scaling" else 1.0  # dπ(E) = c E
    like = {"dtype": params.dtype, "device": params.device}
    # E_kl W puts row l of W into row k; W E_kl puts column k of W into column l
    t_in = torch.zeros(D, *W_in.shape, **like)
    t_in[a, k] = W_in[l]
    t_out = torch.zeros(D, *W_out.shape, **like)
    t_out[a, :, l] = -c * W_out[:, k].T
    t_b = None
    if b_in is not None:
        t_b = torch.zeros(D, b_in.numel(), **like)
        t_b[a, k] = b_in[l]
    if grp.kind == "orthogonal":  # the − E_lk half
        t_in[a, l] -= W_in[k]
        t_out[a, :, k] += c * W_out[:, l].T
        if t_b is not None:
            t_b[a, l] -= b_in[k]
    out = torch.zeros(D, d, **like)
    w_off, b_off = slot[i]
    out[:, w_off : w_off + W_in.numel()] = t_in.reshape(D, -1)
    if t_b is not None:
        out[:, b_off : b_off + b_in.numel()] = t_b
    w2_off = slot[i + 1][0]
    out[:, w2_off : w2_off + W_out.numel()] = t_out.reshape(D, -1)
    return out


def orbit_dimension(symmetry: LinearSymmetry, params: StackParams, rtol: float | None = None,
                    method: str = "auto") -> int:
    """dim G·θ = rank of {M·θ : M ∈ 𝔤}, the numerical rank of :func:`tangent_vectors`.

    Args:
        symmetry: G.
        params: θ.
        rtol: relative threshold. ``"svd"``: singular values below ``rtol · s_max`` count as
            zero, default max(dim G, d)·eps (as ``numpy.linalg.matrix_rank``). ``"gram"``:
            Gram eigenvalues below ``rtol · λ_max`` count as zero, default dim G · eps.
        method: ``"svd"`` of the (dim G, d) tangent matrix (any depth); ``"gram"`` — the
            spectrum of the Gram operator N ↦ P_𝔤(N S + dπ*(R) N) with S = VVᵀ + bbᵀ and
            R = UᵀU, in closed form per group (one hidden layer only; O(h³), independent
            of the input width, for large heads); ``"auto"`` picks ``"gram"`` when the
            stack has one hidden layer.
    """
    if method not in ("auto", "svd", "gram"):
        raise ValueError(f"method must be 'auto', 'svd' or 'gram', got {method!r}")
    symmetry._check(params)
    if method == "auto":
        method = "gram" if len(symmetry.groups) == 1 else "svd"
    if method == "gram":
        return _orbit_dimension_gram(symmetry, params, rtol)
    T = tangent_vectors(symmetry, params)
    s = torch.linalg.svdvals(T)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    if rtol is None:
        rtol = max(T.shape) * torch.finfo(T.dtype).eps
    return int((s > rtol * s[0]).sum())


def _orbit_dimension_gram(symmetry: LinearSymmetry, params: StackParams, rtol: float | None) -> int:
    if len(symmetry.groups) != 1:
        raise ValueError("the 'gram' orbit dimension needs a stack with one hidden layer")
    grp = symmetry.groups[0]
    W, b, U = params.weights[0], params.biases[0], params.weights[1]
    S = W @ W.T + (0 if b is None else torch.outer(b, b))
    R = U.T @ U
    # ⟨M·θ, N·θ⟩ = Tr(Mᵀ N S) + Tr(dπ(M)ᵀ R dπ(N)): the Gram operator's spectrum per group
    if grp.kind == "gl":
        ev = torch.linalg.eigvalsh(S)[:, None] + torch.linalg.eigvalsh(R)[None, :]
    elif grp.kind == "scaling":
        ev = torch.diagonal(S) + grp.alpha**2 * torch.diagonal(R)
    else:
        lam = torch.linalg.eigvalsh(S + R)
        i, j = torch.triu_indices(lam.numel(), lam.numel(), offset=1)
        ev = 0.5 * (lam[i] + lam[j])
    ev = ev.flatten()
    top = float(ev.abs().max()) if ev.numel() else 0.0
    if top == 0.0:
        return 0
    if rtol is None:
        rtol = max(ev.numel(), 1) * torch.finfo(ev.dtype).eps
    return int((ev > rtol * top).sum())


# ----------------------------------------------------------------------------------------------
# Closed-form orbit dimensions of a two-layer network
# ----------------------------------------------------------------------------------------------


def _check_dims(n: int, h: int, m: int) -> None:
    for label, v in (("n", n), ("h", h), ("m", m)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{label} must be a positive integer, got {v!r}")


def orbit_dimension_formula(kind: str, n: int, h: int, m: int, *, bias: bool = False) -> int:
    """Dimension of a generic orbit of a two-layer network (n inputs, h hidden, m outputs).

    The dimension is dim G − dim Stab_G(U, V); the stabilizer's Lie algebra is
    {M ∈ 𝔤 : MV = 0, U dπ(M) = 0}. At a generic point (full-rank U, V, no zero rows):

    * GL_h (Proposition C.3): h² − max(0, h − n)·max(0, h − m).
    * positive scaling: M = diag(d) must vanish on every unit with a nonzero row of V, so the
      stabilizer is trivial and the orbit has dimension h.
    * O(h): M ∈ 𝔰𝔬_h must kill col(V) and col(Uᵀ), a generic subspace of dimension
      min(h, n + m), so the orbit has dimension C(h, 2) − C(max(0, h − n − m), 2).

    The GL formula is the paper's; for scaling and O(h) these are the generic values, which
    differ from Theorem 3.3 / Corollary C.4 when h > max(n, m) — see
    :func:`paper_orbit_dimension`. A hidden bias acts like one more input column (n → n + 1).

    Args:
        kind: ``"gl"``, ``"scaling"`` or ``"orthogonal"``.
        n, h, m: input, hidden and output widths.
        bias: whether the hidden layer has a bias.
    """
    _check_dims(n, h, m)
    if kind not in KINDS:
        raise ValueError(f"unknown group kind {kind!r}; expected one of {list(KINDS)}")
    n_eff = n + 1 if bias else n
    if kind == "gl":
        return h * h - max(0, h - n_eff) * max(0, h - m)
    if kind == "scaling":
        return h
    return math.comb(h, 2) - math.comb(max(0, h - n_eff - m), 2)


def paper_orbit_dimension(kind: str, n: int, h: int, m: int) -> int:
    """The orbit dimension as tabulated in Theorem 3.3 / Corollary C.4 (no biases).

    GL: h² − max(0, h − n)·max(0, h − m); scaling: min(h, max(n, m)); O(h): C(h, 2) if
    h ≤ max(n, m) else C(h, 2) − C(h − max(n, m), 2). The last two are the stabilizer dimensions
    at the special point U₀ = [I 0], V₀ = [I; 0] of the proof, which is not generic for these
    subgroups; :func:`orbit_dimension_formula` gives the generic values (they agree whenever
    h ≤ max(n, m)).
    """
    _check_dims(n, h, m)
    if kind not in KINDS:
        raise ValueError(f"unknown group kind {kind!r}; expected one of {list(KINDS)}")
    if kind == "gl":
        return h * h - max(0, h - n) * max(0, h - m)
    if kind == "scaling":
        return min(h, max(n, m))
    if h <= max(n, m):
        return math.comb(h, 2)
    return math.comb(h, 2) - math.comb(h - max(n, m), 2)
