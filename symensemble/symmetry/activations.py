"""Hidden-layer activations σ and the properties the symmetry code relies on.

Every activation is a small ``nn.Module`` that also declares, as class-level facts, which
parameter-space symmetries it admits (paper §3.3 and §4):

* ``homogeneous_degree`` α: σ(cz) = c^α σ(z) for c > 0 (Example 3.3), so positive diagonal
  rescaling acts with π(g) = g^α. ``None`` when σ is not homogeneous.
* ``linear``: σ is the identity, so the full GL_h acts linearly (Example 3.2).
* ``radial``: σ(z) = f(|z|) z, equivariant under O(h) (Example 3.5). Radial activations act on
  the whole hidden vector (``pointwise`` is False).
* ``nonvanishing``: σ(z) ≠ 0 for every z ≠ 0 — the hypothesis of Theorem D.4 (1) under which the
  nonlinear data-dependent action exists on the non-degenerate locus.
* ``nonzero_at_zero``: σ(0) ≠ 0 — Theorem D.4 (2): the nonlinear action exists everywhere.

Create one by name with :func:`create_activation`; :func:`list_activations` lists the names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "Activation",
    "Identity",
    "ReLU",
    "LeakyReLU",
    "ReLUSqr",
    "Tanh",
    "Sigmoid",
    "Radial",
    "create_activation",
    "list_activations",
    "register_activation",
    "activation_nonvanishing",
    "activation_lipschitz",
]

_REGISTRY: dict[str, type[Activation]] = {}


def register_activation(cls: type[Activation]) -> type[Activation]:
    """Class decorator adding an :class:`Activation` subclass to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"activation {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


class Activation(nn.Module):
    """Base class: an elementwise (or radial) activation with declared symmetry properties."""

    name: ClassVar[str] = ""
    pointwise: ClassVar[bool] = True
    linear: ClassVar[bool] = False
    radial: ClassVar[bool] = False
    nonzero_at_zero: ClassVar[bool] = False

    @property
    def homogeneous_degree(self) -> float | None:
        """Degree α with σ(cz) = c^α σ(z) for all c > 0, or ``None`` (paper Example 3.3)."""
        return None

    @property
    def nonvanishing(self) -> bool:
        """Whether σ(z) ≠ 0 for every nonzero z ∈ R^h (hypothesis of Theorem D.4 (1))."""
        return False

    def config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serializable, so ``create_activation(**config)`` rebuilds it."""
        return {"name": self.name}

    def extra_repr(self) -> str:
        args = {k: v for k, v in self.config().items() if k != "name"}
        return ", ".join(f"{k}={v}" for k, v in args.items())


@register_activation
class Identity(Activation):
    """σ(z) = z. Linear, so GL_h acts with π(g) = g (Example 3.2)."""

    name = "identity"
    linear = True

    @property
    def homogeneous_degree(self) -> float:
        return 1.0

    @property
    def nonvanishing(self) -> bool:
        return True

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z


@register_activation
class ReLU(Activation):
    """σ(z) = max(z, 0); homogeneous of degree 1. Vanishes on the negative orthant."""

    name = "relu"

    @property
    def homogeneous_degree(self) -> float:
        return 1.0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(z)


@register_activation
class LeakyReLU(Activation):
    """σ(z) = max(z, 0) + s·min(z, 0) (Example 3.4); the paper uses s = 0.1.

    Homogeneous of degree 1; σ(z) ≠ 0 for z ≠ 0 whenever s > 0.
    """

    name = "leaky_relu"

    def __init__(self, negative_slope: float = 0.1) -> None:
        super().__init__()
        if not math.isfinite(negative_slope) or negative_slope < 0:
            raise ValueError(f"leaky_relu negative_slope must be finite and >= 0, got {negative_slope}")
        self.negative_slope = float(negative_slope)

    @property
    def homogeneous_degree(self) -> float:
        return 1.0

    @property
    def nonvanishing(self) -> bool:
        return self.negative_slope > 0

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "negative_slope": self.negative_slope}

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return nn.functional.leaky_relu(z, self.negative_slope)


@register_activation
class ReLUSqr(Activation):
    """σ(z) = LeakyReLU_s(z)² + c·z, the activation of the paper's Figure 10 (s = 0.1, c = 0.01).

    Neither homogeneous nor nonvanishing: its scalar zeros are 0 and −c/s².
    """

    name = "relu_sqr"

    def __init__(self, negative_slope: float = 0.1, linear_coef: float = 0.01) -> None:
        super().__init__()
        if negative_slope < 0 or not math.isfinite(negative_slope):
            raise ValueError(f"relu_sqr negative_slope must be finite and >= 0, got {negative_slope}")
        if not math.isfinite(linear_coef):
            raise ValueError(f"relu_sqr linear_coef must be finite, got {linear_coef}")
        self.negative_slope = float(negative_slope)
        self.linear_coef = float(linear_coef)

    @property
    def nonvanishing(self) -> bool:
        # Pointwise zeros at 0 and -c/s^2 (for s > 0): z = (-c/s^2, ..., -c/s^2) is a nonzero root.
        return False

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "negative_slope": self.negative_slope,
            "linear_coef": self.linear_coef,
        }

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return nn.functional.leaky_relu(z, self.negative_slope).square() + self.linear_coef * z


@register_activation
class Tanh(Activation):
    """σ(z) = tanh(z); no continuous linear symmetry, but σ(z) ≠ 0 for z ≠ 0."""

    name = "tanh"

    @property
    def nonvanishing(self) -> bool:
        return True

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z)


@register_activation
class Sigmoid(Activation):
    """σ(z) = 1 / (1 + e^{−z}); no continuous linear symmetry, σ > 0 everywhere (Theorem 4.1)."""

    name = "sigmoid"
    nonzero_at_zero = True

    @property
    def nonvanishing(self) -> bool:
        return True

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(z)


def _radial_tanh(r: torch.Tensor) -> torch.Tensor:
    """f(r) = tanh(r)/r with its limit f(0) = 1."""
    safe = torch.where(r > 0, r, torch.ones_like(r))
    return torch.where(r > 0, torch.tanh(safe) / safe, torch.ones_like(r))


def _radial_shifted_relu(r: torch.Tensor, shift: float) -> torch.Tensor:
    """f(r) = ReLU(r − b)/r (Ganev et al. 2022 step-ReLU), 0 at r = 0."""
    safe = torch.where(r > 0, r, torch.ones_like(r))
    return torch.where(r > 0, torch.relu(safe - shift) / safe, torch.zeros_like(r))


_RADIAL_PROFILES: dict[str, Callable[..., torch.Tensor]] = {
    "tanh": _radial_tanh,
    "shifted_relu": _radial_shifted_relu,
}


@register_activation
class Radial(Activation):
    """Radial rescaling σ(z) = f(|z|) z over the last dimension (Example 3.5), O(h)-equivariant.

    Profiles: ``tanh`` — f(r) = tanh(r)/r (default; σ(z) ≠ 0 for z ≠ 0); ``shifted_relu`` —
    f(r) = ReLU(r − shift)/r.
    """

    name = "radial"
    pointwise = False
    radial = True

    def __init__(self, profile: str = "tanh", shift: float = 0.0) -> None:
        super().__init__()
        if profile not in _RADIAL_PROFILES:
            raise ValueError(
                f"unknown radial profile {profile!r}; expected one of {sorted(_RADIAL_PROFILES)}"
            )
        if not math.isfinite(shift) or shift < 0:
            raise ValueError(f"radial shift must be finite and >= 0, got {shift}")
        self.profile = profile
        self.shift = float(shift)

    @property
    def nonvanishing(self) -> bool:
        return self.profile == "tanh" or self.shift == 0

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "profile": self.profile, "shift": self.shift}

    def radial_factor(self, r: torch.Tensor) -> torch.Tensor:
        """f(r) for norms r ≥ 0."""
        if self.profile == "shifted_relu":
            return _radial_shifted_relu(r, self.shift)
        return _radial_tanh(r)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        r = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
        return self.radial_factor(r) * z


def list_activations() -> list[str]:
    """Names accepted by :func:`create_activation`."""
    return sorted(_REGISTRY)


def create_activation(name: str | Activation, **kwargs: Any) -> Activation:
    """Build an activation by registry name (``"leaky_relu"``, ``"relu_sqr"``, ...).

    Args:
        name: registry name, or an :class:`Activation` instance (returned unchanged).
        **kwargs: constructor arguments, e.g. ``negative_slope=0.1`` for ``leaky_relu``.

    Raises:
        ValueError: for an unknown name or bad arguments.
    """
    if isinstance(name, Activation):
        if kwargs:
            raise ValueError("keyword arguments are not allowed with an Activation instance")
        return name
    if name not in _REGISTRY:
        raise ValueError(f"unknown activation {name!r}; expected one of {list_activations()}")
    cls = _REGISTRY[name]
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments {kwargs} for activation {name!r}: {err}") from None


# Facts about arbitrary activations (registry ones and torch.nn ones) used by the nonlinear action


def activation_nonvanishing(sigma: Callable[..., Any]) -> bool | None:
    """Whether σ(z) ≠ 0 for every nonzero z (Theorem D.4 (1)); ``None`` if unknown.

    Known for the registry activations (:class:`~symensemble.symmetry.activations.Activation`)
    and the common ``torch.nn`` activations.
    """
    if isinstance(sigma, Activation):
        return bool(sigma.nonvanishing)
    if isinstance(sigma, nn.LeakyReLU):
        return sigma.negative_slope > 0
    if isinstance(
        sigma, (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Threshold, nn.Hardshrink, nn.Softshrink)
    ):
        return False  # zero on a half-line or an interval around 0
    if isinstance(
        sigma,
        (
            nn.Identity,
            nn.Tanh,
            nn.Sigmoid,
            nn.ELU,
            nn.SELU,
            nn.CELU,
            nn.GELU,
            nn.SiLU,
            nn.Softplus,
            nn.Softsign,
            nn.Tanhshrink,
            nn.Hardtanh,
            nn.Mish,
        ),
    ):
        return True
    return None


def activation_lipschitz(sigma: Callable[..., Any]) -> float | None:
    """A global Lipschitz constant η of σ, or ``None`` if unknown / not globally Lipschitz."""
    if isinstance(sigma, Activation):
        name = sigma.name
        if name in ("identity", "relu", "tanh", "radial"):
            return 1.0
        if name == "leaky_relu":
            return max(1.0, float(sigma.negative_slope))
        if name == "sigmoid":
            return 0.25
        return None  # relu_sqr is not globally Lipschitz
    if isinstance(sigma, (nn.Identity, nn.ReLU, nn.Tanh, nn.ReLU6, nn.Hardtanh, nn.Softplus)):
        return 1.0
    if isinstance(sigma, nn.LeakyReLU):
        return max(1.0, abs(float(sigma.negative_slope)))
    if isinstance(sigma, nn.Sigmoid):
        return 0.25
    return None
