"""The one percentile every benchmark prints: nearest rank, of samples in any order."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["percentile"]


def percentile(samples: Sequence[float], p: float) -> float:
    """The nearest-rank p-th percentile (p in 0..100) of non-empty samples: a value that
    was measured, never one interpolated between two."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]
