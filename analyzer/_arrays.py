"""Array helpers shared by the analysis steps."""

from __future__ import annotations

import numpy as np


def run_starts(*keys: np.ndarray) -> np.ndarray:
    """True where a run of equal keys begins (keys sorted so that equal ones are adjacent)."""
    n = len(keys[0])
    first = np.zeros(n, bool)
    if n:
        first[0] = True
        for key in keys:
            first[1:] |= key[1:] != key[:-1]
    return first
