"""The symmetry head: Linear (V) → σ → Linear (U), the two layers the paper's symmetries act on."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..inputs import check_model_input
from ..symmetry.activations import Activation, create_activation

__all__ = ["SymHead", "SymModel"]


class SymHead(nn.Module):
    """F(e) = U σ(V e + b_V) + b_U (paper §3.3 with U = W_2, V = W_1 and biases, App. C).

    Args:
        in_features: d, the width of the features entering the head.
        hidden: h, the hidden width on which the symmetry group GL_h acts.
        num_classes: C, the number of logits.
        act: the hidden activation σ, by registry name or instance.
        act_kwargs: constructor arguments for ``act`` given by name.

    Shape:
        features (B, d) → logits (B, C); :meth:`hidden` gives the pre-activation H (B, h).
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        num_classes: int,
        act: str | Activation = "leaky_relu",
        act_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for label, value in (("in_features", in_features), ("hidden", hidden), ("num_classes", num_classes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SymHead {label} must be a positive integer, got {value!r}")
        self.V = nn.Linear(in_features, hidden)
        self.act = create_activation(act, **(act_kwargs or {}))
        self.U = nn.Linear(hidden, num_classes)

    @property
    def in_features(self) -> int:
        return self.V.in_features

    @property
    def hidden_features(self) -> int:
        return self.V.out_features

    @property
    def num_classes(self) -> int:
        return self.U.out_features

    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-activation H = V e + b_V, shape (B, h)."""
        return self.V(features)

    def from_hidden(self, H: torch.Tensor) -> torch.Tensor:
        """Logits U σ(H) + b_U from pre-activations H (..., h)."""
        return self.U(self.act(H))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.from_hidden(self.hidden(features))


class SymModel(nn.Module):
    """Base class of every symensemble model: images in [0, 1] → logits, ending in a SymHead.

    Subclasses implement :meth:`embed` (normalization happens inside) and set ``self.head``.
    The timm-style interface (``forward_features``, ``forward_head``, ``get_classifier``) is
    provided so code written for timm models works unchanged.

    Attributes:
        model_name: registry name; ``model_args`` the constructor arguments (for checkpoints).
        image_size: the input side the model was built for (None: any), checked on forward.
        input_range: the pixel range it expects; inputs outside it give a warning.
    """

    head: SymHead
    model_name: str = ""
    model_args: dict[str, Any]
    image_size: int | None = None
    input_range: tuple[float, float] = (0.0, 1.0)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features entering the head, (B, d), from images (B, 3, H, W) in [0, 1]."""
        raise NotImplementedError

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activation H = V(embed(x)), shape (B, h)."""
        return self.head.hidden(self.embed(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm convention: ``pre_logits=True`` returns the features unchanged."""
        return features if pre_logits else self.head(features)

    def get_classifier(self) -> SymHead:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_model_input(self, x)
        return self.head(self.embed(x))
