"""The scalar settings of a symmetry ensemble, validated once with what was expected."""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import torch

from .aggregates import check_aggregate

__all__ = ["EnsembleOptions", "as_int"]

#: scratch memory per chunk of members when no chunk_size is given
DEFAULT_CHUNK_BYTES = 64 * 2**20


def as_int(value: Any, name: str, minimum: int | None) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return out


class EnsembleOptions(NamedTuple):
    """Checked constructor settings of :class:`~symensemble.ensembles.ensemble.SymmetryEnsemble`."""

    num_members: int
    seed: int
    samples_per_member: int | None
    aggregate: str
    calibration_noise: float
    chunk_size: int | None
    max_chunk_bytes: int
    head_dtype: torch.dtype

    @classmethod
    def check(cls, num_members: Any, seed: Any, samples_per_member: Any, aggregate: Any,
              calibration_noise: Any, chunk_size: Any, max_chunk_bytes: Any, head_dtype: Any
              ) -> EnsembleOptions:
        """Raise ``ValueError`` naming the first bad setting and what it must be."""
        num_members = as_int(num_members, "num_members", minimum=1)
        seed = as_int(seed, "seed", minimum=None)
        if samples_per_member is not None:
            samples_per_member = as_int(samples_per_member, "samples_per_member", minimum=1)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or a positive integer, got {chunk_size!r}")
        if not isinstance(max_chunk_bytes, int) or max_chunk_bytes < 1:
            raise ValueError(f"max_chunk_bytes must be a positive integer, got {max_chunk_bytes!r}")
        if (not isinstance(calibration_noise, (int, float)) or isinstance(calibration_noise, bool)
                or not (math.isfinite(calibration_noise) and calibration_noise >= 0)):
            raise ValueError(f"calibration_noise must be a finite number >= 0, got {calibration_noise!r}")
        if head_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"head_dtype must be torch.float32 or torch.float64, got {head_dtype}")
        return cls(num_members, seed, samples_per_member, check_aggregate(aggregate),
                   float(calibration_noise), chunk_size, max_chunk_bytes, head_dtype)
