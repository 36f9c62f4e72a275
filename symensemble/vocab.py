"""The shared vocabulary: row and role names, default grids, and radius parsing.

Every layer imports these names from here (the robustness pipeline, the attacks, training, the
command line), so no module needs another one only for a constant, and the import graph has
no circle. Importing it loads nothing but the standard library.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "ORIGINAL",
    "WHITEBOX",
    "WORST",
    "ROBUST",
    "CLEAN",
    "THREATS",
    "DEFAULT_TRANSFORMS",
    "PAPER_FGSM_EPS",
    "parse_eps",
    "format_eps",
]

#: The base model's row label (transform name of the unwrapped model).
ORIGINAL = "original"
#: Row label of attacks crafted on the attacked model itself.
WHITEBOX = "whitebox"
#: Per-image worst case over the threat models evaluated (robust only if it survives all).
WORST = "worst"
#: Per-image AND over every attack of the portfolio's cascade.
ROBUST = "robust"
#: Attack name of the unattacked (clean) measurement.
CLEAN = "clean"
THREATS = ("transfer", "adaptive")
DEFAULT_TRANSFORMS = (ORIGINAL, "group", "ginv", "random", "shuffle", "perm_interp")
#: FGSM radii of the paper's Figure 11 (pixel units in [0, 1]).
PAPER_FGSM_EPS = (0.0, 0.003, 0.006, 0.009, 0.012)


def parse_eps(value: Any, name: str = "eps", bounded: bool = True) -> float:
    """One radius (or step size) from a number or a fraction string such as ``"8/255"``.

    Radii are L∞ distances in the pixel units of images in [0, 1], so the value must lie in
    [0, 1]; ``bounded=False`` leaves the range to the caller (a recipe table checks its own
    fields and names them in its message).

    Raises:
        ValueError: not a number or fraction (booleans included), or outside [0, 1].
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} {value!r} is not a number or a fraction like '8/255'")
    if isinstance(value, int | float):
        eps = float(value)
    else:
        text = str(value).strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                eps = float(num) / float(den)
            else:
                eps = float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{name} {value!r} is not a number or a fraction like '8/255'") from None
    if bounded and not (math.isfinite(eps) and 0.0 <= eps <= 1.0):
        raise ValueError(
            f"{name} {value!r} = {eps:g} is outside [0, 1]; radii are in pixel units of images in "
            "[0, 1] (write 8/255 for 8 intensity levels)"
        )
    return eps


def format_eps(eps: float) -> str:
    """A radius as people write it: ``8/255`` for a whole number of levels, else ``0.003``."""
    if eps == 0:
        return "0"
    levels = eps * 255
    if abs(levels - round(levels)) < 1e-6 and round(levels) >= 1:
        return f"{round(levels)}/255"
    return f"{eps:.4g}"
