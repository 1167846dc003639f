"""The passes every entry point goes through: the draft's pass over a
prompt, the target's pass, and applying a selection to the target's KV.

A method declares what it reads (`DraftNeeds`, `TargetNeeds`); the passes
own the contexts, size them from what will be decoded into them (prompt,
lookahead, answer), and return what was captured. Nothing else in the
package prefills the draft or captures attention.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np

from .prefix import KeptCache, PrefixCache
from .scoring import REDUCTIONS, combine

# "eviction": dropping the unselected KV entries and compacting (or, per
# head, rewriting) the target's cache
STAGES = ("draft_prefill", "lookahead", "scoring", "target_prefill", "eviction", "decode")
# Where the flash-attention capture computes the observation rows' softmax
# (the native capture_arm's `scoring`): "auto" runs it as a graph on the
# backend that holds the keys where they live in device memory, else on the
# host; studies/transfers.py sets "graph" or "host" to compare what each moves.
SCORING = "auto"


class Clock:
    """Seconds spent per stage of one call; `on_stage(name)`, if set, is
    told as each stage begins (a progress display names it)."""

    def __init__(self, on_stage: Optional[Callable[[str], None]] = None):
        self.times = {s: 0.0 for s in STAGES}
        self.on_stage = on_stage

    @contextmanager
    def stage(self, name: str):
        if self.on_stage is not None:
            self.on_stage(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] += time.perf_counter() - t0


# ------------------------------------------------------------------ draft

@dataclass(frozen=True)
class DraftNeeds:
    """What a method reads from the draft's pass over the prompt.

    window: the last prompt queries whose attention is captured (0: none),
        weighted linearly 0..1 from oldest to newest if `weighted`;
    lookahead: tokens the draft drafts greedily after the prompt (the first
        from the prefill, each later one from a decode step);
    step_rows: also capture the attention of each of those decode steps;
    start_layer, reduction: the layers captured (start_layer and up) and how
        the query heads of a KV group and the query rows reduce ('max', 'sum');
    logprobs: log p(x_i | x_<i) of every prompt token.
    """

    window: int = 0
    weighted: bool = False
    lookahead: int = 0
    step_rows: bool = False
    start_layer: int = 0
    reduction: str = "max"
    logprobs: bool = False

    @property
    def _capture(self):
        if self.window == 0 and not self.step_rows:
            return None
        return (self.window, self.weighted, self.start_layer, self.reduction)

    def merge(self, other: "DraftNeeds") -> Optional["DraftNeeds"]:
        """One pass that serves both, or None where their captures differ.
        A longer lookahead serves a shorter one: greedy drafting is
        deterministic, so its first tokens and steps are the shorter one's."""
        a, b = self._capture, other._capture
        if a is not None and b is not None and a != b:
            return None
        if (self.logprobs or other.logprobs) and (a or b or self.lookahead or other.lookahead):
            return None  # per-token log-probabilities come from a plain prefill
        base = self if a is not None else other
        return replace(base, lookahead=max(self.lookahead, other.lookahead),
                       step_rows=self.step_rows or other.step_rows, logprobs=self.logprobs or other.logprobs)


@dataclass
class DraftPass:
    """What the draft's pass captured over a prompt of n tokens."""

    needs: DraftNeeds
    rows: Optional[np.ndarray]        # [layer, kv_head, n]: the window's attention
    drafted: np.ndarray               # the drafted tokens
    steps: list                       # per decode step: [layer, kv_head, n]
    logprobs: Optional[np.ndarray]    # [n - 1]
    context: object = field(default=None, repr=False)  # kept open only where asked (`room`)


def capture(ctx, tokens, layers, queries, weights=None, reduce: str = "max", progress=None) -> np.ndarray:
    """Prefill `tokens` after what the context holds, capturing the attention
    of the query positions `queries` in `layers`: [layer, kv_head, key]."""
    ctx.capture_arm(np.asarray(layers, np.int32), np.asarray(queries, np.int32),
                    None if weights is None else np.asarray(weights, np.float32), reduce, SCORING)
    try:
        ctx.prefill(tokens, want="last", progress=progress)
        scores, _ = ctx.capture_take()
    finally:
        ctx.capture_disarm()
    return scores


def draft_pass(model, tokens: np.ndarray, needs: DraftNeeds, options: dict, clock: Clock,
               progress: Optional[Callable] = None, room: int = 0, cache: Optional[PrefixCache] = None) -> DraftPass:
    """The draft prefills the prompt (capturing what `needs` asks) and drafts
    its lookahead. With room > 0 the context stays open with that many free
    cells beyond the lookahead (the draft answering alone decodes there).
    With a `cache`, its context is used: only the tokens after the prefix it
    holds are prefilled (the window's rows are always among them), and it
    keeps the prompt's KV for the next call."""
    n = len(tokens)
    if needs.start_layer >= model.n_layer:
        raise ValueError(f"start_layer {needs.start_layer} >= the draft's {model.n_layer} layers")
    if needs.reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, not {needs.reduction!r}")
    if needs.logprobs and cache is not None:
        raise ValueError("per-token log-probabilities come from a fresh prefill, not a cached prefix")
    layers = np.arange(needs.start_layer, model.n_layer)
    w = min(needs.window, n)
    ctx, start = _open(model, tokens, n + needs.lookahead + room, options, cache, recompute=max(w, 1))
    try:
        rows = logprobs = None
        with clock.stage("draft_prefill"):
            if w:
                weights = np.linspace(0, 1, w) if needs.weighted else None
                rows = capture(ctx, tokens[start:], layers, np.arange(n - w, n), weights, needs.reduction,
                               _offset(progress, start, n))[..., :n]
            elif needs.logprobs:
                logprobs = ctx.prefill(tokens, want="logprobs", progress=progress)
            else:
                ctx.prefill(tokens[start:], progress=_offset(progress, start, n))
        if cache is not None:
            cache.hold(tokens)
        with clock.stage("lookahead"):
            drafted, steps = greedy_lookahead(ctx, model, needs.lookahead,
                                              layers if needs.step_rows else None, needs.reduction, n_keys=n,
                                              progress=progress)
    except BaseException:
        _abandon(ctx, cache)
        raise
    if not room and cache is None:
        ctx.close()
        ctx = None
    return DraftPass(needs, rows, drafted, steps, logprobs, ctx)


def _open(model, tokens: np.ndarray, n_ctx: int, options: dict, cache: Optional[PrefixCache], recompute: int,
          n_seq: int = 1):
    """A pass's context and where its prefill starts: a fresh context of
    n_ctx cells from 0, or the cache's, after the prefix it holds (all but
    the last `recompute` tokens at most)."""
    if cache is None:
        return model.context(n_ctx=n_ctx, n_seq_max=n_seq, **options), 0
    return cache.take(tokens, recompute, n_ctx), cache.reused


def _abandon(ctx, cache: Optional[PrefixCache]) -> None:
    """After a failed pass: a fresh context is closed, a cache forgets what
    the pass decoded."""
    if cache is not None:
        cache.forget()
    else:
        ctx.close()


def _offset(progress: Optional[Callable], start: int, n: int) -> Optional[Callable]:
    """Progress over the whole prompt for a prefill that starts at `start`."""
    if progress is None or not start:
        return progress
    return lambda done, total: progress(start + done, n)


def greedy_lookahead(ctx, model, n_tokens: int, layers=None, reduce: str = "max", n_keys: int = 0,
                     progress: Optional[Callable] = None):
    """Draft `n_tokens` greedily after a prefill that left last-token logits:
    the first comes from the prefill, each later one from a decode step. With
    `layers`, each of those n_tokens - 1 decode steps' attention over the
    first `n_keys` positions is captured; returns (tokens, [per-step scores]).
    progress(i, n_tokens) after each drafted token."""
    tokens, steps = [], []
    ctx.set_sampler(0.0, 1.0, 0)
    for i in range(n_tokens):
        if progress is not None and i:
            progress(i, n_tokens)
        token = ctx.sample()
        if model.is_eog(token):
            break
        tokens.append(token)
        if i + 1 == n_tokens:
            break
        if layers is not None:
            # the step token's own query row: its attention over the prompt
            steps.append(capture(ctx, [token], layers, [ctx.next_pos()], None, reduce)[..., :n_keys])
        else:
            ctx.prefill([token])
    return np.array(tokens, np.int32), steps


# ------------------------------------------------------------------ target

@dataclass(frozen=True)
class TargetNeeds:
    """What a KV method reads from the target's pass over the prompt: the
    attention of the last `window` + 1 prompt queries and of `lookahead`
    drafted tokens appended after them, in every layer, reduced by
    `reduction` (nothing at all if not `captures`)."""

    window: int = 0
    reduction: str = "max"
    lookahead: int = 0
    captures: bool = True

    def merge(self, other: "TargetNeeds") -> Optional["TargetNeeds"]:
        """One pass serves both where the window rows are the same: the
        window's and the drafted tokens' rows are captured apart."""
        if not other.captures:
            return self
        if not self.captures:
            return other
        if (self.window, self.reduction) != (other.window, other.reduction):
            return None
        return replace(self, lookahead=max(self.lookahead, other.lookahead))


@dataclass
class TargetPass:
    """The target's KV of a prompt's first n - 1 tokens in sequence 0 of
    `context`, and the attention captured on the way (keys x[0, n-1))."""

    tokens: np.ndarray
    context: object
    needs: TargetNeeds
    window_rows: Optional[np.ndarray] = None     # [layer, kv_head, n - 1]
    lookahead_rows: Optional[np.ndarray] = None  # [layer, kv_head, n - 1]
    cached: bool = False  # the context is a prefix cache's: answers must leave it whole

    def scores(self, reduction: str, lookahead: bool) -> np.ndarray:
        """[layer, kv_head, key]: the window's rows, with the drafted
        tokens' rows reduced in where `lookahead`."""
        if self.window_rows is None:
            return np.zeros((1, 1, len(self.tokens) - 1), np.float32)
        if lookahead and self.lookahead_rows is not None:
            return combine(self.window_rows, self.lookahead_rows, reduction)
        return self.window_rows


def target_pass(model, tokens: np.ndarray, needs: TargetNeeds, lookahead: np.ndarray, options: dict,
                clock: Clock, room: int, n_seq: int = 1, progress: Optional[Callable] = None,
                cache: Optional[PrefixCache] = None) -> TargetPass:
    """The target prefills the prompt, then the drafted tokens, capturing
    what `needs` asks, and keeps the KV of x[0, n-1) only: the last prompt
    token is decoded again after the selection, at its own position. The
    context holds `room` more cells for that token and the answer. With a
    `cache`, its context is used (two sequences: answers fork from it) and
    only the tokens after the prefix it holds are prefilled."""
    n = len(tokens)
    lookahead = np.asarray(lookahead if needs.captures else [], np.int32)
    w = min(needs.window + 1, n) if needs.captures else 1
    ctx, start = _open(model, tokens, n + len(lookahead) + room, options, cache, recompute=w, n_seq=n_seq)
    rest, progress = tokens[start:], _offset(progress, start, n)
    tp = TargetPass(tokens, ctx, needs, cached=cache is not None)
    try:
        with clock.stage("target_prefill"):
            if needs.captures:
                ctx.capture_arm(np.arange(model.n_layer, dtype=np.int32),
                                np.arange(n - w, n + len(lookahead), dtype=np.int32), None, needs.reduction,
                                SCORING)
                try:
                    ctx.prefill(rest, want="none", progress=progress)
                    rows, _ = ctx.capture_take()
                    tp.window_rows = rows[..., : n - 1]
                    if len(lookahead):
                        ctx.prefill(lookahead, want="none")
                        rows, _ = ctx.capture_take()
                        tp.lookahead_rows = rows[..., : n - 1]
                finally:
                    ctx.capture_disarm()
            else:
                ctx.prefill(rest, want="none", progress=progress)
            ctx.seq_rm(0, n - 1, -1)
        if cache is not None:
            cache.hold(tokens[: n - 1])
    except BaseException:
        _abandon(ctx, cache)
        raise
    return tp


def prefill_answer_context(model, tokens: np.ndarray, options: dict, clock: Clock, room: int,
                           stage: str = "target_prefill", progress: Optional[Callable] = None):
    """A context holding the whole of `tokens`, ready to sample from."""
    ctx = model.context(n_ctx=len(tokens) + room, **options)
    try:
        with clock.stage(stage):
            ctx.prefill(tokens, progress=progress)
    except BaseException:
        ctx.close()
        raise
    return ctx


def prefill_kept(cache: KeptCache, tokens: np.ndarray, positions: np.ndarray, clock: Clock, room: int,
                 progress: Optional[Callable] = None) -> tuple:
    """(AnswerContext, order): the target's context of the prompt tokens at
    `positions` (a prompt-side selection) on a conversation's KeptCache,
    prefilling only what it does not hold; `order` is the prompt positions
    in the order the context holds them."""
    order = cache.order(positions)
    ctx = cache.take(tokens, order, room)
    start = cache.reused
    try:
        with clock.stage("target_prefill"):
            ctx.prefill(tokens[order[start:]], progress=_offset(progress, start, len(order)))
    except BaseException:
        cache.forget()
        raise
    cache.hold(tokens, order)
    # the answer decodes after the held prompt; the next take drops it
    return AnswerContext(ctx, cells=len(order), leave=True), order


# ------------------------------------------------------------------ apply

@dataclass
class AnswerContext:
    """A context ready to sample the answer from, in sequence `seq`; `close`
    gives back what the answer used (a fork, a fresh context)."""

    context: object
    seq: int = 0
    own: bool = True      # close the context itself when done, else drop sequence `seq`
    cells: int = 0        # KV cells the target holds when decoding starts
    leave: bool = False   # neither: a prefix cache's context (its next pass drops the answer)

    def close(self) -> None:
        if self.leave:
            return
        if self.own:
            self.context.close()
        else:
            self.context.seq_rm(self.seq, -1, -1)


def keep_one_set(tp: TargetPass, keep: np.ndarray, clock: Clock, room: int, how: str,
                 model=None, options: Optional[dict] = None) -> AnswerContext:
    """Keep the prompt KV entries `keep` for all layers and heads, then
    decode the last prompt token at its own position. `how`:
    'in_place': the rest is dropped and the cache compacted into a context
        sized for the budget;
    'share': a second sequence shares the kept cells (no copy; decoding
        attends over the whole cache, masked); the pass's KV stays whole;
    'copy': the kept entries are copied, compacted, into a fresh context of
        `model` (`options`); the pass's KV stays whole."""
    ctx, last = tp.context, tp.tokens[-1:]
    with clock.stage("eviction"):
        if how != "share" and _cut_on_host(ctx):
            blob = ctx.state_get_kept(0, keep)
            if how == "in_place":
                ctx.load_state(0, blob, n_ctx=len(keep) + room)
                seq = 0
            else:
                ctx, seq = _loaded(model, options, blob, len(keep) + room), 0
        elif how == "in_place":
            ctx.seq_keep_positions(0, keep)
            ctx.compact(0, n_ctx=len(keep) + room)
            seq = 0
        else:
            ctx.seq_cp(0, 1)
            ctx.seq_keep_positions(1, keep)
            seq = 1
            if how == "copy":
                try:
                    blob = ctx.state_get(1)
                finally:
                    ctx.seq_rm(1, -1, -1)
                ctx, seq = _loaded(model, options, blob, len(keep) + room), 0
    answer = AnswerContext(ctx, seq, own=how != "share", cells=len(keep) + 1)
    try:
        with clock.stage("target_prefill"):
            ctx.prefill(last, seq=seq)
    except BaseException:
        answer.close()
        raise
    return answer


def _cut_on_host(ctx) -> bool:
    """Whether to read the pass's whole KV state once and drop the unkept
    cells on the host: on a device backend, llama.cpp reads a scattered
    set's transposed V one cell range per row, each read a queue submit
    (compaction 50.8 s on Vulkan's lavapipe, against 99 ms this way)."""
    return ctx.model.kv_on_device and ctx.model.per_head_rewritable


def _loaded(model, options: dict, blob: bytes, n_ctx: int):
    """A fresh context of n_ctx cells holding the state `blob`."""
    ctx = model.context(n_ctx=n_ctx, **options)
    try:
        ctx.load_state(0, blob)
    except BaseException:
        ctx.close()
        raise
    return ctx


def keep_per_head(tp: TargetPass, keep: np.ndarray, clock: Clock, room: int, copy: bool,
                  model=None, options: Optional[dict] = None) -> AnswerContext:
    """Every layer and KV head keeps its own entries keep[layer, kv_head, C]
    (state rewrite); the C cells take the positions just before the last
    prompt token, which is then decoded at its own. Raises ValueError where
    the model's KV cache cannot be rewritten. With `copy` the rewrite goes
    to a fresh context (`model`, `options`) and the pass's KV stays whole."""
    ctx, n, c = tp.context, len(tp.tokens), keep.shape[-1]
    cell_pos = np.arange(n - 1 - c, n - 1, dtype=np.int32)
    with clock.stage("eviction"):
        if copy:
            ctx = _loaded(model, options, ctx.state_rewrite(ctx.state_get(0), keep, cell_pos), c + room)
        else:
            ctx.keep_per_head(0, keep, cell_pos, n_ctx=c + room)
    answer = AnswerContext(ctx, 0, own=True, cells=c + 1)
    try:
        with clock.stage("target_prefill"):
            ctx.prefill(tp.tokens[-1:])
    except BaseException:
        if copy:
            answer.close()
        raise
    return answer
