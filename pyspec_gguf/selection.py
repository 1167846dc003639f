"""Turning per-token scores into a kept set: the pruning half of every method.

A method only says how important each prompt token is (higher = keep);
these functions decide which tokens survive a budget. All return sorted,
unique int32 indices. Ties are broken deterministically: after pooling,
equal scores are ordered by the raw (unpooled) score, then by position,
earliest first.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

POOLS = ("max", "avg")


def pool1d(scores: np.ndarray, kernel: int, how: str = "max") -> np.ndarray:
    """Centred 1-D pooling, stride 1, zero padding of (k-1)//2 on the left and
    the rest on the right; 'avg' divides by k (padding included)."""
    if how not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, not {how!r}")
    scores = np.asarray(scores, dtype=np.float64)
    if kernel <= 1 or len(scores) == 0:
        return scores.astype(np.float32)
    left = (kernel - 1) // 2
    padded = np.concatenate([np.zeros(left), scores, np.zeros(kernel - 1 - left)])
    windows = sliding_window_view(padded, kernel)
    pooled = windows.max(axis=1) if how == "max" else windows.sum(axis=1) / kernel
    # float32 result: sums that differ only in rounding order tie exactly
    return pooled.astype(np.float32)


def rank(pooled: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Indices by importance: pooled score, then raw score (both descending),
    then position (ascending)."""
    positions = np.arange(len(pooled))
    return np.lexsort((positions, -np.asarray(raw, np.float64), -np.asarray(pooled, np.float64)))


def neighbour_offsets(n: int) -> np.ndarray:
    """Offsets [-(n-1)//2, n-1-(n-1)//2], nearest first (0, -1, 1, -2, 2, ...)."""
    lo = -((n - 1) // 2)
    offsets = np.arange(lo, lo + max(n, 1))
    return offsets[np.lexsort((offsets, np.abs(offsets)))]


def _first_unique(seq: np.ndarray) -> np.ndarray:
    _, first = np.unique(seq, return_index=True)
    return seq[np.sort(first)]


def _finish(order: np.ndarray, budget: int) -> np.ndarray:
    return np.sort(_first_unique(order)[:budget]).astype(np.int32)


def _forced_indices(n: int, window: int, budget: int, protected) -> np.ndarray:
    """The observation window (the last min(window, budget) tokens), then any
    protected indices, in that order."""
    w = min(window, budget, n)
    forced = np.arange(n - w, n)
    if protected is not None and len(protected):
        forced = np.concatenate([forced, np.asarray(protected, dtype=np.int64)])
    return _first_unique(forced)


def select_specpc(raw: np.ndarray, budget: int, window: int = 64, kernel: int = 64, neighbours: int = 64,
                  pool: str = "max", protected=None) -> np.ndarray:
    """SpecPC's rule: pool, take the top `budget` tokens, widen each to its
    `neighbours` nearest tokens, put the window (and protected tokens) first,
    dedupe keeping first occurrences, cut to the budget."""
    raw = np.asarray(raw, np.float32)
    n = len(raw)
    if n <= budget:
        return np.arange(n, dtype=np.int32)
    top = rank(pool1d(raw, kernel, pool), raw)[:budget]
    widened = np.clip(top[:, None] + neighbour_offsets(neighbours)[None, :], 0, n - 1).reshape(-1)
    order = np.concatenate([_forced_indices(n, window, budget, protected), widened])
    return _finish(order, budget)


def select_topk(raw: np.ndarray, budget: int, window: int = 32, kernel: int = 7, pool: str = "max",
                protected=None) -> np.ndarray:
    """SpecKV/SnapKV's rule over the keys of `raw`: always keep the window (the
    last `window` entries) and protected tokens, fill the rest of the budget
    with the best keys outside them by pooled score."""
    raw = np.asarray(raw, np.float32)
    n = len(raw)
    if n <= budget:
        return np.arange(n, dtype=np.int32)
    forced = _forced_indices(n, window, budget, protected)
    ranked = rank(pool1d(raw, kernel, pool), raw)
    return _finish(np.concatenate([forced, ranked]), budget)


def select_topk_per_head(raw: np.ndarray, budget: int, window: int = 32, kernel: int = 7, pool: str = "max",
                         protected=None) -> np.ndarray:
    """select_topk applied to every (layer, KV head) of raw [layer, head, key]
    on its own: [layer, head, min(budget, keys)] sorted indices, the window
    and protected tokens kept in every head, as the paper's SpecKV/SnapKV do."""
    raw = np.asarray(raw, np.float32)
    if raw.ndim != 3:
        raise ValueError(f"per-head selection needs scores [layer, head, key], not shape {raw.shape}")
    return np.stack([np.stack([select_topk(row, budget, window, kernel, pool, protected) for row in layer])
                     for layer in raw])


def select_chunks(raw: np.ndarray, budget: int, chunk: int = 32, window: int = 0, protected=None) -> np.ndarray:
    """SpecPrefill's rule: score 32-token chunks by their mean, keep whole
    chunks, best first, while they fit next to the window and protected tokens."""
    raw = np.asarray(raw, np.float32)
    n = len(raw)
    if n <= budget:
        return np.arange(n, dtype=np.int32)
    forced = _forced_indices(n, window, budget, protected)
    kept = np.zeros(n, bool)
    kept[forced[:budget]] = True
    n_chunks = -(-n // chunk)
    means = np.array([raw[c * chunk:(c + 1) * chunk].mean() for c in range(n_chunks)])
    for c in np.lexsort((np.arange(n_chunks), -means)):
        span = np.arange(c * chunk, min(n, (c + 1) * chunk))
        new = span[~kept[span]]
        if kept.sum() + len(new) > budget:
            continue
        kept[new] = True
    return np.flatnonzero(kept).astype(np.int32)


def select_head_tail(n: int, budget: int, protected=None) -> np.ndarray:
    """Keep the first and last tokens: protected tokens, then half of what is
    left at each end."""
    if n <= budget:
        return np.arange(n, dtype=np.int32)
    kept = np.zeros(n, bool)
    if protected is not None and len(protected):
        kept[np.asarray(protected)[:budget]] = True
    room = budget - int(kept.sum())
    head = room // 2
    free = np.flatnonzero(~kept)
    kept[free[:head]] = True
    kept[free[len(free) - (room - head):]] = True
    return np.flatnonzero(kept).astype(np.int32)


def select_sink_recent(n: int, budget: int, sinks: int = 4, protected=None) -> np.ndarray:
    """StreamingLLM: the first `sinks` tokens, protected tokens, and the
    most recent tokens for the rest of the budget."""
    if n <= budget:
        return np.arange(n, dtype=np.int32)
    forced = np.arange(min(sinks, budget))
    if protected is not None and len(protected):
        forced = np.concatenate([forced, np.asarray(protected, np.int64)])
    return _finish(np.concatenate([forced, np.arange(n - 1, -1, -1)]), budget)
