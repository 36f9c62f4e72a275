"""Symmetry ensembles: many transformed copies of one trained head, at almost no extra cost.

A trained network ends in the head F(e) = U σ(V e + b_V) + b_U (a :class:`SymHead`). Acting on
(U, V) with random group elements g_k gives G models with (nearly) the same loss — for the
nonlinear data-dependent action exactly the same logits on each member's own calibration
images (App. I, eqs. 84–85; §4). :class:`SymmetryEnsemble` wraps the model as one
``nn.Module`` over [0, 1] images:

* the backbone runs once per batch and gives the pre-activations H = V e + b_V (B × h);
* member k computes W_k σ(g_k H) + b_U, with (g_k, W_k) drawn by a transform
  (:mod:`symensemble.ensembles.transforms`; ``group``: W_k = U π(g_k, H_k)); all members run as one
  batched matrix product, chunked over members so memory stays bounded;
* the outputs are aggregated: ``mean`` (log of the mean member probability, differentiable),
  ``vote`` (the paper's majority vote) or ``logit_mean``.

Numerics: with eps = 10, g_k = exp(eps·T_k) has condition numbers of 1e6–1e12 and
σ(g_k H_k) up to ~1e15 (h = 16), so members are drawn *and evaluated* in float64 by default
(``head_dtype``); in float32 the members' outputs would be dominated by rounding. A member
reproduces its calibration logits to about cond(σ(g_k H_k)) × 1e-16 × |logits| — below 1e-4 for
cond ≤ 1e12 (≈ 98% of members at eps = 10, h = 16; see ``docs/ensembles.md``).

Example:
    >>> import symensemble as se
    >>> model = se.load_model("paper_cnn")
    >>> ens = se.SymmetryEnsemble(model, calibration_images, num_members=200, eps=10.0)
    >>> ens.aggregate = "vote"
    >>> predictions = ens(test_images).argmax(1)
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ..inputs import check_model_input, require_finite
from ..runtime import eval_mode, thread_cap
from ..symmetry.activations import Activation
from ..symmetry.heads import HeadParts, find_head
from .transforms import TRANSFORMS, MemberDraw, MemberTransform, create_transform

__all__ = ["SymmetryEnsemble", "HeadParts", "TRANSFORMS", "AGGREGATES", "DEFAULT_SAMPLES_PER_HIDDEN",
           "default_samples_per_member"]

log = logging.getLogger(__name__)

#: Aggregates accepted by :attr:`SymmetryEnsemble.aggregate`.
AGGREGATES = ("mean", "vote", "logit_mean")

_MEMBER_BUFFERS = ("g", "W", "b", "condition", "calibration_hidden")
_DEFAULT_CHUNK_BYTES = 64 * 2**20
#: default calibration images per member, as a multiple of the hidden width h. With s = h the
#: solve for π is square: members interpolate their h images exactly and extrapolate with the
#: full cond(σ(g H_k)) ≈ 1e7 (eps = 10); s = 2h makes π a least-squares fit that costs far less
#: clean accuracy (docs/ensembles.md, "Choosing samples_per_member": the measured table).
DEFAULT_SAMPLES_PER_HIDDEN = 2
#: the calibration noise has its own stream, so turning it on leaves the member draws unchanged
_NOISE_SEED_OFFSET = 0x6E6F697365


_ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)  # fmt: skip


def _is_pointwise(act: Callable[[Tensor], Tensor]) -> bool:
    """Whether σ acts entry by entry (then any tensor layout will do)."""
    if isinstance(act, Activation):
        return bool(act.pointwise)
    if isinstance(act, nn.PReLU):
        return act.num_parameters == 1
    return isinstance(act, _ELEMENTWISE) or act in (torch.tanh, torch.sigmoid, torch.relu)


def _as_int(value: Any, name: str, minimum: int | None) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return out


def _buffer(t: Tensor, device: torch.device) -> Tensor:
    """A float64 copy on ``device`` that is a normal tensor even when made under inference_mode
    (so an ensemble built inside ``torch.inference_mode()`` can later be attacked)."""
    with torch.inference_mode(False):
        return t.to(device, torch.float64, copy=True).contiguous()


def _is_submodule(model: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in model.modules())


def _model_head(model: nn.Module) -> HeadParts:
    """The model's head by :func:`~symensemble.symmetry.heads.find_head`, with embed(x) required."""
    try:
        parts = find_head(model)
    except ValueError as err:
        parts, reason = None, str(err)
    if parts is not None and parts.embed is not None:
        return parts
    raise ValueError(
        f"{type(model).__name__} has no symmetry head: expected a symensemble model with "
        "`embed(x)` and `head.V`, `head.act`, `head.U` (a SymHead)"
        + ("" if parts is not None else f" ({reason})")
        + "; for your own network use SymmetryEnsemble.from_modules(model, calibration_images, "
        "embed=..., V='fc1', act='act', U='fc2')"
    )


def _check_parts(model: nn.Module, parts: HeadParts, transform: str) -> None:
    """Refuse heads the transforms cannot act on, with what was expected."""
    for label, layer in (("V", parts.V), ("U", parts.U)):
        if not isinstance(layer, nn.Linear):
            raise ValueError(
                f"transform {transform!r} acts on a Linear → activation → Linear head, but {label} "
                f"is a {type(layer).__name__}; expected an nn.Linear"
            )
        if not _is_submodule(model, layer):
            raise ValueError(
                f"{label} must be a submodule of the model (so it moves and saves with it)"
            )
    if parts.U.in_features != parts.V.out_features:
        raise ValueError(
            f"U takes {parts.U.in_features} features but V gives {parts.V.out_features}; "
            "expected V: d → h and U: h → C with the same hidden width h"
        )
    if not callable(parts.act) or not callable(parts.embed):
        raise ValueError("act and embed must be callables (modules or functions)")
    h = parts.V.out_features
    probe = torch.linspace(-2.0, 2.0, 3 * h, dtype=torch.float64).view(3, h)
    try:
        out = parts.act(probe)
    except Exception as err:  # noqa: BLE001 - any failure means the head is unusable here
        raise ValueError(
            f"the hidden activation {parts.act!r} must accept float64 CPU tensors of shape "
            f"(..., {h}) (members are drawn in float64): {err}"
        ) from None
    if not isinstance(out, Tensor) or out.shape != probe.shape:
        raise ValueError(
            f"the hidden activation must map (..., {h}) to (..., {h}); got "
            f"{getattr(out, 'shape', type(out))}"
        )


def _as_images(images: Tensor | None) -> Tensor | None:
    """uint8 → float/255; floats kept; shape and range checks."""
    if images is None:
        return None
    if not isinstance(images, Tensor):
        raise ValueError(f"calibration_images must be a tensor, got {type(images).__name__}")
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(
            "calibration_images must be a non-empty batch (N, ...), got shape "
            f"{tuple(images.shape)}"
        )
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    if not torch.is_floating_point(images):
        raise ValueError(f"calibration_images must be uint8 or floating point, got {images.dtype}")
    require_finite(images, "calibration_images")
    lo, hi = float(images.min()), float(images.max())
    if images.ndim == 4 and (lo < -1e-6 or hi > 1 + 1e-6):
        log.warning(
            "calibration_images span [%.3g, %.3g]; symensemble models expect [0, 1] images and "
            "normalize inside",
            lo,
            hi,
        )
    return images


def default_samples_per_member(hidden: int) -> int:
    """The default s for a head of width h: ``DEFAULT_SAMPLES_PER_HIDDEN · h``."""
    return DEFAULT_SAMPLES_PER_HIDDEN * int(hidden)


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


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
        aggregate: ``mean``, ``vote`` or ``logit_mean`` (settable attribute).
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
        aggregate: str = "mean",
        *,
        ridge: float | None = None,
        max_condition: float | None = None,
        max_redraws: int = 3,
        calibration_noise: float = 0.0,
        resample_on_forward: bool = False,
        chunk_size: int | None = None,
        max_chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
        head_dtype: torch.dtype = torch.float64,
        head: HeadParts | None = None,
        _head_checked: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        num_members = _as_int(num_members, "num_members", minimum=1)
        seed = _as_int(seed, "seed", minimum=None)
        if samples_per_member is not None:
            samples_per_member = _as_int(samples_per_member, "samples_per_member", minimum=1)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or a positive integer, got {chunk_size!r}")
        if not isinstance(max_chunk_bytes, int) or max_chunk_bytes < 1:
            raise ValueError(f"max_chunk_bytes must be a positive integer, got {max_chunk_bytes!r}")
        if (not isinstance(calibration_noise, (int, float)) or isinstance(calibration_noise, bool)
                or not (math.isfinite(calibration_noise) and calibration_noise >= 0)):
            raise ValueError(f"calibration_noise must be a finite number >= 0, got {calibration_noise!r}")
        self.calibration_noise = float(calibration_noise)
        if head_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"head_dtype must be torch.float32 or torch.float64, got {head_dtype}")
        self.member_transform = create_transform(
            transform, eps, ridge=ridge, max_condition=max_condition, max_redraws=max_redraws
        )
        self.base_model = model
        self._parts = _model_head(model) if head is None else head
        if not _head_checked:  # from_modules checks its parts before the composition check
            _check_parts(model, self._parts, self.member_transform.name)
        self._pointwise = _is_pointwise(self._parts.act)
        self.aggregate = aggregate
        self._num_members = num_members
        h = self._parts.hidden_features
        self._samples_per_member = (default_samples_per_member(h) if samples_per_member is None
                                    else samples_per_member)
        self.resample_on_forward = bool(resample_on_forward)
        self.chunk_size = chunk_size
        self.max_chunk_bytes = max_chunk_bytes
        self.head_dtype = head_dtype
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

        for name in _MEMBER_BUFFERS:
            self.register_buffer(name, None)
        if self.member_transform.uses_calibration:
            needed = num_members * self._samples_per_member
            images = _as_images(None if calibration_images is None else calibration_images[:needed])
            have = 0 if images is None else images.shape[0]
            if have < needed:
                raise ValueError(
                    f"transform {self.transform!r} with num_members={num_members} and "
                    f"samples_per_member={self._samples_per_member} needs at least {needed} "
                    f"calibration images (member k uses images [k·s, (k+1)·s)), got {have}; pass "
                    "more images, fewer members or a smaller samples_per_member"
                )
            if self._samples_per_member > h:
                log.info(
                    "samples_per_member=%d > h=%d: π is a least-squares fit and members no longer "
                    "reproduce the model exactly on their calibration images",
                    self._samples_per_member,
                    h,
                )
            hidden = self._calibration_hidden(images)
            if calibration_noise:
                noise_gen = torch.Generator().manual_seed((seed + _NOISE_SEED_OFFSET) % 2**63)
                noise = torch.randn(hidden.shape, generator=noise_gen, dtype=hidden.dtype)
                hidden = hidden + calibration_noise * noise.to(hidden.device)
            if getattr(self.member_transform, "ridge", None) is None:
                _check_distinct(hidden, self._samples_per_member)
            self.calibration_hidden = _buffer(hidden, _model_device(model))
        self.resample()

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

        def resolve(label: str, ref: Any) -> Any:
            if isinstance(ref, str):
                try:
                    return model.get_submodule(ref)
                except AttributeError:
                    names = [n for n, _ in model.named_modules() if n]
                    raise ValueError(
                        f"{label}={ref!r} is not a submodule of {type(model).__name__}; its "
                        "submodules "
                        f"are {names[:20]}{' ...' if len(names) > 20 else ''}"
                    ) from None
            return ref

        embed_fn = resolve("embed", embed) if embed is not None else _flatten
        parts = HeadParts(embed_fn, resolve("V", V), resolve("act", act), resolve("U", U))
        transform = kwargs.get("transform", "group")
        _check_parts(model, parts, getattr(transform, "name", transform))
        if check_composition:
            sample = None if calibration_images is None else calibration_images[:8]
            _check_composition(model, parts, _as_images(sample))
        return cls(model, calibration_images, head=parts, _head_checked=True, **kwargs)

    @torch.inference_mode()
    def _calibration_hidden(self, images: Tensor, batch_size: int = 1000) -> Tensor:
        """Pre-activations H = V(embed(x)) of the calibration images, model in eval mode."""
        model = self.base_model
        device = _model_device(model)
        with eval_mode(model):
            out = [
                self._hidden(images[i : i + batch_size].to(device))
                for i in range(0, images.shape[0], batch_size)
            ]
        return torch.cat(out)

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
        """How :meth:`forward` combines members: ``mean``, ``vote`` or ``logit_mean``."""
        return self._aggregate

    @aggregate.setter
    def aggregate(self, value: str) -> None:
        if value not in AGGREGATES:
            raise ValueError(f"unknown aggregate {value!r}; expected one of {list(AGGREGATES)}")
        self._aggregate = value

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

        Args:
            seed: reseed the ensemble's generator first; ``None`` continues its stream, so
                successive calls give new, reproducible draws.

        Returns:
            self.
        """
        if seed is not None:
            self._generator.manual_seed(int(seed))
        U64 = self._parts.params(device="cpu").U
        hidden = None
        if self.member_transform.uses_calibration:
            G, s, h = self._num_members, self._samples_per_member, self.hidden_features
            hidden = self.calibration_hidden.to("cpu").view(G, s, h).transpose(1, 2)
        with _few_threads(self.hidden_features):
            draw = self.member_transform.draw(
                U64, self._parts.act, self._num_members, self._generator, hidden
            )
        self._store(draw)
        if draw.condition is not None:
            c = draw.condition
            log.info(
                "%s ensemble: %d members, eps=%g, s=%d; cond(σ(g_k H_k)) median %.3g, max %.3g; "
                "%d members above 1e12 reproduce their calibration logits only to ~cond·1e-16",
                self.transform,
                self._num_members,
                self.eps,
                self._samples_per_member,
                float(c.median()),
                float(c.max()),
                int((c > 1e12).sum()),
            )
        return self

    def _store(self, draw: MemberDraw) -> None:
        device = _model_device(self.base_model)
        bias = self._parts.params(dtype=None).b_U
        self.g = _buffer(draw.g, device)
        self.W = _buffer(draw.W, device)
        self.b = _buffer(torch.zeros(self.num_classes) if bias is None else bias, device)
        self.condition = None if draw.condition is None else _buffer(draw.condition, device)

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

    def _hidden(self, x: Tensor) -> Tensor:
        return self._parts.hidden(x)

    def _chunks(self, batch: int) -> Iterator[slice]:
        G = self._num_members
        if self.chunk_size is not None:
            size = self.chunk_size
        else:
            h, C = self.hidden_features, self.num_classes
            per_member = batch * (2 * h + 2 * C) * torch.finfo(self.head_dtype).bits // 8
            size = max(1, self.max_chunk_bytes // max(1, per_member))
        for start in range(0, G, size):
            yield slice(start, min(G, start + size))

    def _member_chunk(self, H: Tensor, g: Tensor, W: Tensor, b: Tensor) -> Tensor:
        """Logits of a chunk of c members, layout (c, C, B): W_k σ(g_k H) + b_U.

        One GEMM computes every g_k H at once, [g_1; …; g_c] (c·h × h) @ Hᵀ → (c, h, B), and one
        batched product applies the W_k. A σ that is not known to act elementwise gets its
        input as (B, c, h), so that it acts on each h-vector (e.g. a radial activation).
        """
        c, h = g.shape[0], g.shape[-1]
        if self._pointwise:
            S = self._parts.act(torch.mm(g.reshape(c * h, h), H.transpose(0, 1))).view(c, h, -1)
        else:
            Z = torch.mm(H, g.reshape(c * h, h).transpose(0, 1)).view(H.shape[0], c, h)
            S = self._parts.act(Z).permute(1, 2, 0)
        return torch.baddbmm(b.view(1, -1, 1), W, S)

    def _run(self, H: Tensor, reduce: Callable[[Tensor], Tensor]) -> list[Tensor]:
        """Apply ``reduce`` to each chunk's (c, C, B) logits; checkpointed under autograd."""
        dt = self.head_dtype
        Hd = H.to(dt)
        g, W, b = self.g.to(dt), self.W.to(dt), self.b.to(dt)
        chunks = list(self._chunks(H.shape[0]))
        checkpoint = torch.is_grad_enabled() and Hd.requires_grad and len(chunks) > 1

        def step(Hc: Tensor, gc: Tensor, Wc: Tensor) -> Tensor:
            return reduce(self._member_chunk(Hc, gc, Wc, b))

        out = []
        for sl in chunks:
            if checkpoint:
                out.append(
                    torch.utils.checkpoint.checkpoint(step, Hd, g[sl], W[sl], use_reentrant=False)
                )
            else:
                out.append(step(Hd, g[sl], W[sl]))
        return out

    def member_logits(self, x: Tensor) -> Tensor:
        """Every member's logits, differentiable with respect to x.

        Shape:
            x (B, 3, H, W) → (G, B, C), in the backbone's dtype.
        """
        if self.resample_on_forward:
            self.resample()
        H = self._hidden(x)
        if self.is_exact:
            logits = self._parts.U(self._parts.act(H))
            return logits.unsqueeze(0).expand(self._num_members, -1, -1).clone()
        parts = self._run(H, lambda L: L)
        return torch.cat(parts).transpose(1, 2).to(H.dtype).contiguous()

    def forward(self, x: Tensor, aggregate: str | None = None) -> Tensor:
        """Aggregate the members' predictions by ``aggregate`` (default :attr:`aggregate`).

        Passing ``aggregate`` reads the ensemble through another aggregate for this call
        only (attacks differentiate ``mean`` while accuracy is counted by ``vote``), without
        changing the shared module.

        * ``mean``: log of the mean member softmax, log(1/G Σ_k softmax(logits_k)) — a
          log-probability, differentiable (computed as a log-sum-exp, so it stays finite).
        * ``vote``: fraction of members whose argmax is each class; ``argmax`` gives the
          majority vote (ties: lowest class index). Not differentiable (no graph is built).
        * ``logit_mean``: mean member logits.

        Shape:
            x (B, 3, H, W) → (B, C).
        """
        check_model_input(self.base_model, x, "SymmetryEnsemble")
        mode = self._aggregate if aggregate is None else aggregate
        if mode not in AGGREGATES:
            raise ValueError(f"unknown aggregate {mode!r}; expected one of {list(AGGREGATES)}")
        if mode == "vote":
            with torch.no_grad():
                return self._forward(x, mode)
        return self._forward(x, mode)

    def _forward(self, x: Tensor, mode: str) -> Tensor:
        if self.resample_on_forward:
            self.resample()
        H = self._hidden(x)
        G = self._num_members
        if self.is_exact:
            logits = self._parts.U(self._parts.act(H))
            if mode == "mean":
                return torch.log_softmax(logits, dim=-1)
            if mode == "vote":
                return nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
            return logits
        if mode == "mean":
            out = self._log_mean_softmax(H)
        elif mode == "logit_mean":
            out = torch.stack(self._run(H, lambda L: L.sum(0))).sum(0) / G
        else:
            C = self.num_classes

            def votes(L: Tensor) -> Tensor:
                winners = L.max(1).indices  # (c, B); first maximum, like argmax (and 5x faster)
                return torch.zeros(C, L.shape[-1], dtype=torch.int64, device=L.device).scatter_add_(
                    0, winners, torch.ones_like(winners)
                )

            out = torch.stack(self._run(H, votes)).sum(0).to(self.head_dtype) / G
        return out.transpose(0, 1).to(H.dtype)

    def _log_mean_softmax(self, H: Tensor) -> Tensor:
        """log(1/G Σ_k softmax(logits_k)), layout (C, B).

        The mean probability is accumulated directly (one softmax per chunk). Where some class
        probability underflows (wild members at large eps can have logit gaps > 700), those
        batch columns are recomputed as a log-sum-exp of log-softmaxes, so the result and its
        gradient stay finite.
        """
        G = self._num_members
        P = torch.stack(self._run(H, lambda L: torch.softmax(L, dim=1).sum(0))).sum(0)
        floor = torch.finfo(P.dtype).tiny * 2.0**40
        out = P.clamp_min(floor).log() - math.log(G)
        bad = torch.nonzero((P < floor).any(0)).flatten()
        if bad.numel():
            parts = self._run(H[bad], lambda L: torch.logsumexp(torch.log_softmax(L, dim=1), dim=0))
            stable = torch.logsumexp(torch.stack(parts), dim=0) - math.log(G)
            out = out.index_copy(1, bad, stable)
        return out

    def extra_repr(self) -> str:
        return (
            f"num_members={self._num_members}, transform={self.transform!r}, eps={self.eps:g}, "
            f"samples_per_member={self._samples_per_member}, aggregate={self._aggregate!r}, "
            + (f"calibration_noise={self.calibration_noise:g}, " if self.calibration_noise else "")
            + f"stochastic={self.is_stochastic}, head_dtype={self.head_dtype}"
        )


def _check_distinct(hidden: Tensor, s: int) -> None:
    """Refuse members whose calibration images give the same pre-activations.

    Two equal columns make σ(g H_k) rank-deficient for every g. In the backbone's precision
    "equal" means equal up to rounding (a duplicated image in another batch row differs by a
    few ulps), so columns closer than 100·eps(dtype) relative to their norm count as equal.

    Shape:
        hidden (G·s, h).
    """
    if s < 2:
        return
    G = hidden.shape[0] // s
    Hk = hidden[: G * s].detach().to(torch.float64).view(G, s, -1)
    dist = torch.cdist(Hk, Hk)  # (G, s, s)
    norm = Hk.norm(dim=-1)
    scale = torch.maximum(norm.unsqueeze(-1), norm.unsqueeze(-2)).clamp_min(
        torch.finfo(torch.float64).tiny
    )
    rel = (dist / scale).masked_fill(torch.eye(s, dtype=torch.bool), math.inf)
    tol = 100 * torch.finfo(hidden.dtype).eps
    bad = torch.nonzero(rel <= tol)
    if bad.numel():
        k, i, j = (int(v) for v in bad[0])
        raise ValueError(
            f"member {k}: σ(g_k H_k) is rank-deficient for every g (condition number inf): "
            f"calibration images {k * s + i} and {k * s + j} have the same hidden "
            f"pre-activations (relative difference {float(rel[k, i, j]):.2g}); pass distinct "
            "calibration images, or ridge=... for a regularized solve"
        )


def _few_threads(h: int) -> contextlib.AbstractContextManager[None]:
    """Run the many tiny float64 LAPACK calls of a draw on one thread when h is small.

    Right after a backbone forward, OpenMP workers still spin-wait; multi-threaded MKL calls
    on (G, h, h) batches then contend with them and a 5 ms draw can take seconds (measured
    3.2 s vs 4 ms on 2 cores). One thread avoids that; large h keeps all threads.
    """
    return thread_cap(1 if h <= 64 else torch.get_num_threads())


def _flatten(x: Tensor) -> Tensor:
    return x.flatten(1)


@torch.no_grad()
def _check_composition(
    model: nn.Module, parts: HeadParts, images: Tensor | None, n: int = 8
) -> None:
    """Raise unless U(act(V(embed(x)))) equals model(x) on a few images."""
    if images is None:
        return
    x = images[:n].to(_model_device(model))
    try:
        with eval_mode(model):
            expected = model(x)
            got = parts(x)
    except Exception as err:  # noqa: BLE001 - report any failure as a wrong decomposition
        raise ValueError(
            f"could not evaluate U(act(V(embed(x)))) on the calibration images: {err}"
        ) from None
    if not isinstance(expected, Tensor) or expected.shape != got.shape:
        raise ValueError(
            f"model(x) has shape {getattr(expected, 'shape', type(expected))} but "
            "U(act(V(embed(x)))) "
            f"has shape {tuple(got.shape)}; embed must give exactly the features entering V"
        )
    err = float((expected - got).abs().max())
    tol = 1e-4 * (1.0 + float(expected.abs().max()))
    if not err <= tol:
        raise ValueError(
            f"model(x) differs from U(act(V(embed(x)))) by {err:.3g} on calibration images: the "
            "named modules must make up the model's whole output path (embed = everything before "
            "V, nothing after U); pass check_composition=False to skip this check"
        )
