"""Numeric helpers shared by the backends and the search: exact integer scaling of rows."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional

import numpy as np

MAX_DENOMINATOR = 10 ** 6   # rows are exact when all their numbers share a denominator up to this
MAX_FRACTIONS = 4096        # distinct fractional values examined per row before giving up on exactness


def common_denominator(values: np.ndarray, limit: int = MAX_DENOMINATOR) -> Optional[int]:
    """Smallest common denominator ``q <= limit`` making every value an integer, or None."""
    q = 1
    frac = values[values != np.round(values)]
    uniq = np.unique(frac)
    if len(uniq) > MAX_FRACTIONS:
        return None
    for v in uniq:
        f = Fraction(float(v)).limit_denominator(limit)
        if abs(float(f) - v) > 1e-12 * max(1.0, abs(v)):
            return None
        q = q * f.denominator // math.gcd(q, f.denominator)
        if q > limit:
            return None
    return q


__all__ = ["MAX_DENOMINATOR", "MAX_FRACTIONS", "common_denominator"]
