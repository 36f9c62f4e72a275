"""Symmetry ensembles: many transformed copies of one trained head, at almost no extra cost.

A trained network ends in the head F(e) = U σ(V e + b_V) + b_U (found by
:func:`~symensemble.symmetry.heads.find_head`). Acting on (U, V) with random group elements
g_k gives G models with (nearly) the same loss — for the nonlinear data-dependent action
exactly the same logits on each member's own calibration images (App. I, eqs. 84–85; §4).
:class:`SymmetryEnsemble` wraps the model as one ``nn.Module`` over [0, 1] images:

* the backbone runs once per batch and gives the pre-activations H = V e + b_V (B × h);
* member k computes W_k σ(g_k H) + b_U, with (g_k, W_k) drawn by a transform
  (:mod:`symensemble.ensembles.transforms`; ``group``: W_k = U π(g_k, H_k), H_k from
  :mod:`symensemble.ensembles.calibration`); all members run as batched matrix products,
  chunked over members so memory stays bounded (:mod:`symensemble.ensembles.members`);
* the outputs are aggregated (:mod:`symensemble.ensembles.aggregates`).

Numerics: with eps = 10, g_k = exp(eps·T_k) has condition numbers of 1e6–1e12 and
σ(g_k H_k) up to ~1e15 (h = 16), so members are drawn *and evaluated* in float64 by default
(``head_dtype``); in float32 the members' outputs would be dominated by rounding. A member
reproduces its calibration logits to about cond(σ(g_k H_k)) × 1e-16 × |logits| — below 1e-4 for
cond ≤ 1e12 (≈ 98% of members at eps = 10, h = 16; see ``docs/ensembles.md``).

Threads are the caller's: nothing here changes torch's thread count during a forward (only
the constructor runs its many tiny LAPACK calls on one thread, see :func:`_few_threads`).

Example:
    >>> import symensemble as se
    >>> model = se.load_model("paper_cnn")
    >>> ens = se.SymmetryEnsemble(model, calibration_images, num_members=200, eps=10.0)
    >>> predictions = ens(test_images, aggregate="vote").argmax(1)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..inputs import check_model_input
from ..runtime import thread_cap
from ..symmetry.heads import HeadParts
from .aggregates import AGGREGATES, check_aggregate, combine, combine_exact
from .block import run_block_members
from .calibration import (
    DEFAULT_SAMPLES_PER_HIDDEN,
    as_images,
    check_ensemble_memory,
    default_samples_per_member,
    log_conditions,
    member_images,
    model_device,
    prepare_hidden,
)
from .locate import model_head_parts
from .members import as_buffer, chunk_slices, is_pointwise, member_bytes, positions_as_rows, run_members
from .options import DEFAULT_CHUNK_BYTES, EnsembleOptions
from .spatial import spatial_group_draw
from .transforms import TRANSFORMS, MemberDraw, MemberTransform, create_transform
from .wiring import check_composition as verify_composition
from .wiring import check_parts, model_head, parts_from_names

__all__ = ["SymmetryEnsemble", "HeadParts", "TRANSFORMS", "AGGREGATES", "DEFAULT_SAMPLES_PER_HIDDEN",
           "default_samples_per_member"]

log = logging.getLogger(__name__)

_MEMBER_BUFFERS = ("g", "W", "b", "condition", "calibration_hidden")


def _few_threads(h: int) -> contextlib.AbstractContextManager[None]:
    """Run the many tiny float64 LAPACK calls of the first draw on one thread when h is small.

    Right after a backbone forward, OpenMP workers still spin-wait; multi-threaded MKL calls
    on (G, h, h) batches then contend with them and a 5 ms draw can take seconds (measured
    3.2 s vs 4 ms on 2 cores). One thread avoids that; large h keeps all threads. Constructor only.
    """
    return thread_cap(1 if h <= 64 else torch.get_num_threads())


class SymmetryEnsemble(nn.Module):
    """An ensemble of G transformed copies of a model's head, as one module over [0, 1] images.

    Member k has the head (W_k, g_k V) with (g_k, W_k) drawn by ``transform``; for ``group``
    (App. I): g_k = exp(eps·T_k), T_k with i.i.d. N(0, 1/h) entries (the paper's text writes
    g = I + εM; its notebook and this package use the exponential map), and
    W_k = U π(g_k, H_k), π(g, H_k) = σ(H_k) σ(g H_k)⁺, solved by least squares from H_k, the
    pre-activations of the member's own calibration images [k·s, (k+1)·s). Its logits are
    W_k σ(g_k H) + b_U (eq. 85); with s ≤ h they equal the model's on those s images.

    Args:
        model: a symensemble model (``embed`` + SymHead) — see :meth:`from_modules` for others.
        calibration_images: [0, 1] images (N, 3, H, W), float or uint8 (divided by 255), with
            N ≥ num_members·samples_per_member; may be ``None`` for transforms that do not use
            them (all but ``group`` and ``shuffle``).
        num_members: G.
        eps: size of the random move: g = exp(eps·T) (``perm_interp``: its own formula).
        transform: a name in :data:`TRANSFORMS` or a
            :class:`~symensemble.ensembles.transforms.MemberTransform` (which then carries its own eps).
        samples_per_member: s, calibration images per member (default 2h, see
            :data:`DEFAULT_SAMPLES_PER_HIDDEN`). s ≤ h makes members exact on their images (the
            paper's choice is s = h); s > h gives a least-squares π, which extrapolates better.
        seed: seed of the members' random draws (a CPU generator; reproducible across devices).
        aggregate: the default aggregate of :meth:`forward`, one of :data:`AGGREGATES`
            (another one per call: ``ens(x, aggregate=...)``).
        ridge: relative ridge for π (``group``/``shuffle``); ``None`` solves exactly and raises on
            a rank-deficient σ(g_k H_k).
        max_condition: cond(σ(g_k H_k)) above which a member is rank-deficient (default
            1/eps(float64) ≈ 4.5e15).
        max_redraws: rank-deficient members are redrawn this many times before the error.
        calibration_noise: standard deviation of Gaussian noise added to the calibration
            pre-activations H_k before π(g, H_k) is solved (seeded by ``seed``). The authors'
            notebook adds 1e-4 (``store_batch``); the default 0 solves on the exact H_k.
        resample_on_forward: draw new members on every forward (stochastic, for EOT).
        chunk_size: members per batched chunk; default from ``max_chunk_bytes``.
        max_chunk_bytes: scratch memory per chunk when ``chunk_size`` is None (64 MiB).
        head_dtype: dtype the member heads are evaluated in (float64; float32 is faster but
            rounding dominates ill-conditioned members at large eps).
        head: explicit :class:`HeadParts` (used by :meth:`from_modules`).

    Raises:
        ValueError: bad arguments, too few calibration images, a head the transform cannot
            handle, or a rank-deficient σ(g_k H_k) (naming the member and its condition number).

    Shape:
        x (B, 3, H, W) → forward (B, C); member_logits (G, B, C).

    Memory:
        Forward without gradients holds one chunk of c members: c·B·(2h + 2C) numbers of
        ``head_dtype`` (plus B·C accumulators), at most ``max_chunk_bytes``. With gradients,
        chunks are checkpointed (recomputed during backward), so the graph keeps only each
        chunk's (C, B) aggregate (member_logits: its (c, C, B) logits) plus one chunk's scratch.
    """

    def __init__(
        self,
        model: nn.Module,
        calibration_images: Tensor | None = None,
        num_members: int = 200,
        eps: float = 10.0,
        transform: str | MemberTransform = "group",
        samples_per_member: int | None = None,
        seed: int = 0,
        aggregate: str = "vote",
        *,
        ridge: float | None = None,
        max_condition: float | None = None,
        max_redraws: int = 3,
        calibration_noise: float = 0.0,
        resample_on_forward: bool = False,
        chunk_size: int | None = None,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        head_dtype: torch.dtype = torch.float64,
        head: HeadParts | None = None,
        _head_checked: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        opts = EnsembleOptions.check(num_members, seed, samples_per_member, aggregate,
                                     calibration_noise, chunk_size, max_chunk_bytes, head_dtype)
        self.member_transform = create_transform(
            transform, eps, ridge=ridge, max_condition=max_condition, max_redraws=max_redraws
        )
        self.base_model = model
        self._parts = model_head(model) if head is None else head
        if not _head_checked:  # from_modules checks its parts before the composition check
            check_parts(model, self._parts, self.member_transform.name)
        self._pointwise = is_pointwise(self._parts.act)
        self._aggregate = opts.aggregate
        self._num_members = opts.num_members
        self._samples_per_member = (opts.samples_per_member or
                                    default_samples_per_member(self._parts.hidden_features))
        self.calibration_noise = opts.calibration_noise
        self.resample_on_forward = bool(resample_on_forward)
        self.chunk_size, self.max_chunk_bytes = opts.chunk_size, opts.max_chunk_bytes
        self.head_dtype = opts.head_dtype
        self.seed = opts.seed
        self._generator = torch.Generator().manual_seed(opts.seed)
        for name in _MEMBER_BUFFERS:
            self.register_buffer(name, None)
        self._calibration_images: Tensor | None = None  # spatial heads: streamed on each draw
        self._positions = 1  # calibration rows per image (block mode: tokens)
        self._prepare_calibration(calibration_images)
        with _few_threads(self.hidden_features):
            self.resample()

    def _prepare_calibration(self, calibration_images: Tensor | None) -> None:
        """Check memory and images; dense heads keep H_k (noise added, distinctness checked)."""
        G, s, uses = self._num_members, self._samples_per_member, self.member_transform.uses_calibration
        check_ensemble_memory(G, s, self.hidden_features, self.num_classes,
                              uses and not self._parts.spatial)
        if not uses:
            return
        images = member_images(calibration_images, G, s, self.transform, self.hidden_features)
        if self._parts.spatial:
            self._calibration_images = images
            return
        exact = getattr(self.member_transform, "ridge", None) is None
        hidden, self._positions = prepare_hidden(self.base_model, self._parts, images, s,
                                                 self.calibration_noise, self.seed, exact)
        self.calibration_hidden = as_buffer(hidden, model_device(self.base_model))

    # ----------------------------------------------------------------------------------------
    # Construction helpers
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_modules(
        cls,
        model: nn.Module,
        calibration_images: Tensor | None = None,
        *,
        embed: str | Callable[[Tensor], Tensor] | None,
        V: str | nn.Linear,
        act: str | Callable[[Tensor], Tensor],
        U: str | nn.Linear,
        check_composition: bool = True,
        **kwargs: Any,
    ) -> SymmetryEnsemble:
        """Wrap your own network whose output is U(act(V(embed(x)))) for named submodules.

        Args:
            model: the network; ``model(x)`` must equal ``U(act(V(embed(x))))``.
            calibration_images: as in the constructor.
            embed: the features entering V: a submodule name (``"features"``), a module or a
                callable ``x → (B, d)``; ``None`` means ``x.flatten(1)``.
            V, U: names (``"fc1"``, ``"classifier.2"``) or the ``nn.Linear`` submodules.
            act: the hidden activation: a submodule name, a module or a callable.
            check_composition: verify on a few calibration images that the named pieces
                reproduce ``model(x)`` (raises if not).
            **kwargs: the constructor's other arguments (num_members, eps, transform, ...).

        Raises:
            ValueError: a missing name, non-Linear V/U, mismatched widths, or pieces that do not
                compose to the model's output.

        Example:
            >>> ens = SymmetryEnsemble.from_modules(net, images, embed="features", V="fc1",
            ...                                     act="act", U="fc2", num_members=50)
        """
        parts = parts_from_names(model, embed, V, act, U)
        transform = kwargs.get("transform", "group")
        check_parts(model, parts, getattr(transform, "name", transform))
        if check_composition:
            sample = None if calibration_images is None else calibration_images[:8]
            verify_composition(model, parts, as_images(sample))
        return cls(model, calibration_images, head=parts, _head_checked=True, **kwargs)

    @classmethod
    def from_model(cls, model: nn.Module, calibration_images: Tensor | None, *, hidden: Any = "auto",
                   act: Any = "auto", pool: str = "auto", classifier: Any = "auto", **kwargs: Any
                   ) -> SymmetryEnsemble:
        """Wrap any classifier ending in Z → σ → (global average pooling) → Linear.

        The head is found by :func:`~symensemble.ensembles.locate.locate_head` (``hidden``,
        ``act``, ``pool``, ``classifier`` as there) and checked on a few calibration images.
        ``pool="block"``: block mode on the Linear pair ``hidden`` → ``act`` → ``classifier``
        inside the network (:mod:`symensemble.ensembles.block`).
        For a spatial head π is solved on pooled features (:mod:`symensemble.ensembles.spatial`),
        members are evaluated in float32 (``head_dtype``; pooling keeps them well conditioned)
        and s defaults to 2C. ``**kwargs``: the constructor's other arguments.

        Example:
            >>> ens = SymmetryEnsemble.from_model(torchvision_resnet, train_images[:50 * 1024],
            ...                                   num_members=50, eps=1.0)
        """
        transform = kwargs.get("transform", "group")
        parts = model_head_parts(model, calibration_images, hidden, act, pool, classifier,
                                 getattr(transform, "name", transform))
        kwargs.setdefault("head_dtype", torch.float32 if parts.spatial else torch.float64)
        return cls(model, calibration_images, head=parts, _head_checked=True, **kwargs)

    # ----------------------------------------------------------------------------------------
    # Public attributes
    # ----------------------------------------------------------------------------------------

    @property
    def num_members(self) -> int:
        """G, the number of members."""
        return self._num_members

    @property
    def transform(self) -> str:
        """Name of the member transform (``group``, ``ginv``, ...)."""
        return self.member_transform.name

    @property
    def eps(self) -> float:
        return self.member_transform.eps

    @property
    def samples_per_member(self) -> int:
        """s, calibration images per member."""
        return self._samples_per_member

    @property
    def hidden_features(self) -> int:
        return self._parts.hidden_features

    @property
    def num_classes(self) -> int:
        return self._parts.num_classes

    @property
    def aggregate(self) -> str:
        """How :meth:`forward` combines members by default (read-only: pass
        ``aggregate=...`` to a call to read the ensemble another way)."""
        return self._aggregate

    @property
    def is_stochastic(self) -> bool:
        """True when members are redrawn on every forward (``resample_on_forward``)."""
        return self.resample_on_forward

    @property
    def is_exact(self) -> bool:
        """True for ``identity``: the ensemble evaluates the model itself."""
        return self.member_transform.name == "identity"

    # ----------------------------------------------------------------------------------------
    # Members
    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def resample(self, seed: int | None = None) -> SymmetryEnsemble:
        """Draw new members (new g_k; the same calibration images).

        Runs on the caller's threads (tiny h: one thread is often faster, see
        :func:`~symensemble.runtime.thread_cap`).

        Args:
            seed: reseed the ensemble's generator first; ``None`` continues its stream, so
                successive calls give new, reproducible draws.

        Returns:
            self.
        """
        if seed is not None:
            self._generator.manual_seed(int(seed))
        G, s, h = self._num_members, self._samples_per_member, self.hidden_features
        if self._calibration_images is not None:  # a spatial head: π on pooled features
            draw = spatial_group_draw(self.base_model, self._parts, self._calibration_images,
                                      self.member_transform, G, s, self._generator, self.head_dtype)
        else:
            U64 = self._parts.U.weight.detach().to("cpu", torch.float64)
            hidden = None
            if self.member_transform.uses_calibration:
                hidden = self.calibration_hidden.to("cpu").view(G, s * self._positions, h).transpose(1, 2)
            draw = self.member_transform.draw(U64, self._parts.act, G, self._generator, hidden)
        self._store(draw)
        log_conditions(draw.condition, self.transform, G, self.eps, s)
        return self

    def _store(self, draw: MemberDraw) -> None:
        device = model_device(self.base_model)
        bias = self._parts.U.bias
        self.g = as_buffer(draw.g, device)
        self.W = as_buffer(draw.W, device)
        self.b = as_buffer(torch.zeros(self.num_classes) if bias is None else bias.detach(), device)
        self.condition = None if draw.condition is None else as_buffer(draw.condition, device)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> SymmetryEnsemble:
        # Members follow device moves but keep float64: `.float()` / `.to(dtype)` must not round
        # ill-conditioned members (use head_dtype to evaluate in another precision).
        saved = {n: self._buffers[n] for n in _MEMBER_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            self._buffers[name] = old.to(self._buffers[name].device)
        return self

    # ----------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------

    def _run(self, H: Tensor, reduce: Callable[[Tensor], Tensor]) -> list[Tensor]:
        """Apply ``reduce`` to each chunk's (c, C, B) logits; checkpointed under autograd."""
        dt = self.head_dtype
        if self._parts.pool == "block":  # H is the images: every member runs the network
            members = (self.g.to(dt), self.W.to(dt), self.b.to(dt))
            return run_block_members(self.base_model, self._parts, H, members, reduce, dt)
        rows, P = positions_as_rows(H)
        per_member = member_bytes(H.shape[0], self.hidden_features, self.num_classes, dt, P)
        chunks = chunk_slices(self._num_members, per_member, self.chunk_size, self.max_chunk_bytes)
        members = (self.g.to(dt), self.W.to(dt), self.b.to(dt))
        return run_members(self._parts.act, self._pointwise, rows.to(dt), members, chunks, reduce, P)

    def member_logits(self, x: Tensor) -> Tensor:
        """Every member's logits, differentiable with respect to x.

        Shape:
            x (B, 3, H, W) → (G, B, C), in the backbone's dtype.
        """
        if self.resample_on_forward:
            self.resample()
        H = self._hidden_or_images(x)
        if self.is_exact:
            logits = self._exact_logits(H)
            return logits.unsqueeze(0).expand(self._num_members, -1, -1).clone()
        parts = self._run(H, lambda L: L)
        return torch.cat(parts).transpose(1, 2).to(H.dtype).contiguous()

    def forward(self, x: Tensor, aggregate: str | None = None) -> Tensor:
        """Aggregate the members' predictions by ``aggregate`` (default :attr:`aggregate`).

        Passing ``aggregate`` reads the ensemble through another aggregate for this call
        only, without changing the shared module. The aggregates are described in
        :mod:`symensemble.ensembles.aggregates`:

        * ``vote`` (the default): fraction of members whose argmax is each class; ``argmax``
          gives the majority vote (ties: lowest class index). Differentiable by a
          straight-through estimator: the value is the vote, the gradient that of
          ``soft_vote`` — so ``torchattacks.PGD(ens)`` or ART's ``PyTorchClassifier`` attack
          the ensemble as it is and judge success by its vote.
        * ``soft_vote``: log of the mean scale-free member softmax (the vote's surrogate).
        * ``mean``: log of the mean member softmax, log(1/G Σ_k softmax(logits_k)) — a
          log-probability (computed as a log-sum-exp, so it stays finite).
        * ``logit_mean``: mean member logits.

        Shape:
            x (B, 3, H, W) → (B, C).
        """
        check_model_input(self.base_model, x, "SymmetryEnsemble")
        mode = check_aggregate(self._aggregate if aggregate is None else aggregate)
        return self._forward(x, mode)

    def _hidden_or_images(self, x: Tensor) -> Tensor:
        return x if self._parts.pool == "block" else self._parts.hidden(x)

    def _exact_logits(self, H: Tensor) -> Tensor:
        return self.base_model(H) if self._parts.pool == "block" else self._parts.from_hidden(H)

    def _forward(self, x: Tensor, mode: str) -> Tensor:
        if self.resample_on_forward:
            self.resample()
        H = self._hidden_or_images(x)
        if self.is_exact:
            return combine_exact(mode, self._exact_logits(H))
        out = combine(mode, self._run, H, self._num_members, self.head_dtype)
        return out.transpose(0, 1).to(H.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_members={self._num_members}, transform={self.transform!r}, eps={self.eps:g}, "
            f"samples_per_member={self._samples_per_member}, aggregate={self._aggregate!r}, "
            + (f"calibration_noise={self.calibration_noise:g}, " if self.calibration_noise else "")
            + f"stochastic={self.is_stochastic}, head_dtype={self.head_dtype}"
        )
