"""Attention scores from a model run: the capture side of every method.

Captures come back as float32 [layer, kv_head, position]; `aggregate`
reduces them to one score per position.
"""

from __future__ import annotations

import numpy as np

REDUCTIONS = ("max", "sum")


def aggregate(scores: np.ndarray, how: str = "max") -> np.ndarray:
    """[layer, kv_head, position] -> [position], by max or sum over layers and heads."""
    if how not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, not {how!r}")
    return scores.max(axis=(0, 1)) if how == "max" else scores.sum(axis=(0, 1))


def prefill_with_capture(ctx, tokens, layers, queries, weights=None, reduce="max", progress=None) -> np.ndarray:
    """Prefill `tokens` after what the context holds, capturing the attention
    of the query positions `queries` in `layers`."""
    ctx.capture_arm(np.asarray(layers, np.int32), np.asarray(queries, np.int32),
                    None if weights is None else np.asarray(weights, np.float32), reduce)
    try:
        ctx.prefill(tokens, progress=progress)
        scores, _ = ctx.capture_take()
    finally:
        ctx.capture_disarm()
    return scores


def greedy_lookahead(ctx, model, n_tokens: int, layers=None, reduce="max", n_keys: int = 0):
    """Draft `n_tokens` greedily after a prefill that left last-token logits:
    the first comes from the prefill, each later one from a decode step. With
    `layers`, each of those n_tokens - 1 decode steps' attention over the
    first `n_keys` positions is captured; returns (tokens, [per-step scores])."""
    tokens, steps = [], []
    ctx.set_sampler(0.0, 1.0, 0)
    for i in range(n_tokens):
        token = ctx.sample()
        if model.is_eog(token):
            break
        tokens.append(token)
        if i + 1 == n_tokens:
            break
        if layers is not None:
            # the step token's own query row: its attention over the prompt
            scores = prefill_with_capture(ctx, [token], layers, [ctx.next_pos()], None, reduce)
            steps.append(scores[..., :n_keys])
        else:
            ctx.prefill([token])
    return np.array(tokens, np.int32), steps
