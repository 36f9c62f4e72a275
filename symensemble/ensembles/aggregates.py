"""How a symmetry ensemble combines its members' logits into one (B, C) output.

Each aggregate is computed from chunks of members without ever holding all G members'
logits: a ``run(H, reduce)`` callable (the ensemble's chunked member evaluation) applies
``reduce`` to each chunk's logits of layout (c, C, B) and returns the per-chunk results,
which are summed here. Layouts below are (C, B); the ensemble transposes to (B, C).

* ``vote`` — the paper's majority vote, the default. Its value is the fraction of members
  voting for each class (argmax: the vote, ties to the lowest class index). It is also
  differentiable: the backward pass is that of the soft vote (a straight-through estimator,
  value of the vote, gradient of the surrogate), so outside attack libraries that call
  ``loss(ens(x), y).backward()`` attack the vote and judge success by it.
* ``soft_vote`` — log of the mean *scale-free* member softmax, log(1/G Σ_k softmax(L_k / s_k)),
  s_k the detached standard deviation of member k's logits over classes: every member gets
  logits of unit spread, so no member with huge logits dominates the gradient and no softmax
  saturates; each member's argmax (its vote) is unchanged.
* ``mean`` — log of the mean member softmax (a log-probability, differentiable).
* ``logit_mean`` — mean member logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["AGGREGATES", "DIFFERENTIABLE", "check_aggregate", "combine", "combine_exact"]

#: Aggregates accepted by :class:`~symensemble.ensembles.ensemble.SymmetryEnsemble`.
AGGREGATES = ("mean", "vote", "logit_mean", "soft_vote")
#: All of them carry a gradient (``vote`` the soft vote's, by straight-through).
DIFFERENTIABLE = AGGREGATES

Reduce = Callable[[Tensor], Tensor]
Run = Callable[[Tensor, Reduce], list[Tensor]]


def check_aggregate(mode: str) -> str:
    if mode not in AGGREGATES:
        raise ValueError(f"unknown aggregate {mode!r}; expected one of {list(AGGREGATES)}")
    return mode


def _votes(L: Tensor) -> Tensor:
    """(c, C, B) logits → (C, B) int64 counts of the members' argmax."""
    winners = L.max(1).indices  # (c, B); first maximum, like argmax (and 5x faster)
    return torch.zeros(L.shape[1], L.shape[-1], dtype=torch.int64, device=L.device).scatter_add_(
        0, winners, torch.ones_like(winners)
    )


def _scale_free_softmax(L: Tensor, dim: int) -> Tensor:
    """softmax(L / s) with s the detached std of L over ``dim`` (each member: unit spread)."""
    scale = L.std(dim=dim, keepdim=True).detach().clamp_min(1e-12)
    return torch.softmax(L / scale, dim=dim)


def _soft_vote(run: Run, H: Tensor, G: int) -> Tensor:
    P = torch.stack(run(H, lambda L: _scale_free_softmax(L, dim=1).sum(0))).sum(0)
    return P.clamp_min(1e-300).log() - math.log(G)


def _log_mean_softmax(run: Run, H: Tensor, G: int) -> Tensor:
    """log(1/G Σ_k softmax(logits_k)), layout (C, B).

    The mean probability is accumulated directly (one softmax per chunk). Where some class
    probability underflows (wild members at large eps can have logit gaps > 700), those
    batch columns are recomputed as a log-sum-exp of log-softmaxes, so the result and its
    gradient stay finite.
    """
    P = torch.stack(run(H, lambda L: torch.softmax(L, dim=1).sum(0))).sum(0)
    floor = torch.finfo(P.dtype).tiny * 2.0**40
    out = P.clamp_min(floor).log() - math.log(G)
    bad = torch.nonzero((P < floor).any(0)).flatten()
    if bad.numel():
        parts = run(H[bad], lambda L: torch.logsumexp(torch.log_softmax(L, dim=1), dim=0))
        stable = torch.logsumexp(torch.stack(parts), dim=0) - math.log(G)
        out = out.index_copy(1, bad, stable)
    return out


def _straight_through(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` forward, the gradient of ``surrogate`` backward (exactly ``value``: s − s = 0)."""
    return value + (surrogate - surrogate.detach())


def _vote(run: Run, H: Tensor, G: int, dtype: torch.dtype) -> Tensor:
    """Vote fractions (C, B); with a graph to build, the soft vote's gradient rides along."""
    if not (torch.is_grad_enabled() and H.requires_grad):
        return torch.stack(run(H, _votes)).sum(0).to(dtype) / G

    def both(L: Tensor) -> Tensor:  # one pass over the members: counts and soft-vote sums
        return torch.cat([_votes(L).to(L.dtype), _scale_free_softmax(L, dim=1).sum(0)])

    sums = torch.stack(run(H, both)).sum(0)
    C = sums.shape[0] // 2
    votes = sums[:C].detach().to(dtype) / G
    surrogate = sums[C:].clamp_min(1e-300).log() - math.log(G)
    return _straight_through(votes, surrogate.to(dtype))


def combine(mode: str, run: Run, H: Tensor, G: int, dtype: torch.dtype) -> Tensor:
    """The aggregate ``mode`` of G members evaluated chunk by chunk by ``run``, layout (C, B).

    Args:
        dtype: the members' evaluation dtype (vote fractions are formed in it).
    """
    if mode == "mean":
        return _log_mean_softmax(run, H, G)
    if mode == "logit_mean":
        return torch.stack(run(H, lambda L: L.sum(0))).sum(0) / G
    if mode == "soft_vote":
        return _soft_vote(run, H, G)
    return _vote(run, H, G, dtype)


def combine_exact(mode: str, logits: Tensor) -> Tensor:
    """The aggregate of G identical members (the ``identity`` transform): (B, C) → (B, C)."""
    if mode == "mean":
        return torch.log_softmax(logits, dim=-1)
    if mode == "logit_mean":
        return logits
    soft = _scale_free_softmax(logits, dim=-1).clamp_min(1e-300).log()
    if mode == "soft_vote":
        return soft
    vote = nn.functional.one_hot(logits.detach().argmax(-1), logits.shape[-1]).to(logits.dtype)
    return _straight_through(vote, soft) if logits.requires_grad else vote
