"""Reductions of captured attention: [layer, kv_head, position] scores to
what a selection rule reads."""

from __future__ import annotations

import numpy as np

REDUCTIONS = ("max", "sum")


def aggregate(scores: np.ndarray, how: str = "max") -> np.ndarray:
    """[layer, kv_head, position] -> [position], by max or sum over layers and heads."""
    if how not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, not {how!r}")
    return scores.max(axis=(0, 1)) if how == "max" else scores.sum(axis=(0, 1))


def combine(a: np.ndarray, b: np.ndarray, how: str = "max") -> np.ndarray:
    """Two captures of the same keys by different query rows, reduced as the
    rows within one capture are (max, or sum)."""
    if how not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, not {how!r}")
    return np.maximum(a, b) if how == "max" else a + b
