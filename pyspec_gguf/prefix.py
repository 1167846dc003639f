"""A context kept between prompts: the KV of the last prompt, reused up to
the longest common token prefix with the next one.

A conversation about a document sends the same document and history again
with every question; the passes prefill only what follows the common
prefix. The cache records exactly the prompt tokens its sequence 0 holds
from position 0; what a pass decodes after them (the drafted lookahead, an
answer) is dropped by the next `take`.
"""

from __future__ import annotations

import threading
from typing import Optional

import numpy as np

from ._log import logger as log

# a saved state is loaded where it holds this many more of a prompt's tokens
# than the cache does, and written where the cache holds this many more
# than the saved states do: reading or writing a state costs far less than
# prefilling its tokens, but not nothing
STATE_MIN_GAIN = 256


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def cached_tokens(cache: Optional["PrefixCache"], tokens: np.ndarray) -> int:
    """Prompt tokens `cache` (None: no cache) already holds for `tokens`."""
    return 0 if cache is None else common_prefix(cache.tokens, tokens)


class PrefixCache:
    """One model's context whose sequence 0 holds the KV of `tokens`.

    Args:
        model: the model whose context this is.
        options: context options (threads, batch sizes).
        n_seq: sequences of the context (2 lets an answer or a saved copy
            share the cached cells without touching sequence 0).
        headroom: cells made beyond what a prompt needs when the context is
            (re)made, so that the next turns of a conversation fit without
            making it again.
    """

    def __init__(self, model, options: dict, n_seq: int = 2, headroom: int = 1024):
        self.model, self.options, self.n_seq, self.headroom = model, options, n_seq, headroom
        self.context = None
        self.tokens = np.empty(0, np.int32)
        self.reused = 0  # tokens the last `take` found cached

    def take(self, tokens: np.ndarray, recompute_last: int, n_ctx: int):
        """Make sequence 0 hold the longest common prefix of `tokens` and what
        it holds — but at most len(tokens) - recompute_last tokens, so the
        last ones are decoded again (their attention rows are captured) — in
        a context of at least n_ctx cells. Returns the context; the caller
        prefills tokens[self.reused:] and then calls `hold`."""
        keep = max(0, min(common_prefix(self.tokens, tokens), len(tokens) - recompute_last))
        if self.context is not None:
            self.context.seq_rm(0, keep, -1)
            for seq in range(1, self.n_seq):
                self.context.seq_rm(seq, -1, -1)
        self.tokens, self.reused = self.tokens[:keep], keep
        if self.context is None or self.context.n_ctx < n_ctx:
            self._resize(n_ctx + self.headroom)
        return self.context

    def hold(self, tokens: np.ndarray) -> None:
        """Sequence 0 now holds the KV of `tokens` (a prefill succeeded)."""
        self.tokens = np.asarray(tokens, np.int32).copy()

    def forget(self) -> None:
        """After a failed prefill the cells past the reused prefix are unknown."""
        if self.context is not None:
            self.context.seq_rm(0, len(self.tokens), -1)

    def _resize(self, n_ctx: int) -> None:
        """A context of n_ctx cells holding what this one holds: the state is
        copied over, nothing is prefilled again."""
        blob = self.context.state_get(0) if self.context is not None and len(self.tokens) else None
        if self.context is not None:
            self.context.close()
            self.context = None
        ctx = self.model.context(n_ctx=n_ctx, n_seq_max=self.n_seq, **self.options)
        if blob is not None:
            try:
                ctx.load_state(0, blob)
            except BaseException:
                ctx.close()
                self.tokens = np.empty(0, np.int32)
                raise
        self.context = ctx

    def state(self, n_tokens: int) -> bytes:
        """The state of the first n_tokens cached tokens (a copy shared in
        sequence 1 is serialized; sequence 0 is untouched)."""
        if not 0 < n_tokens <= len(self.tokens):
            raise ValueError(f"the cache holds {len(self.tokens)} tokens, not {n_tokens}")
        ctx = self.context
        if n_tokens == ctx.pos_max(0) + 1:
            return ctx.state_get(0)
        ctx.seq_cp(0, 1, 0, n_tokens)
        try:
            return ctx.state_get(1)
        finally:
            ctx.seq_rm(1, -1, -1)

    def load(self, tokens: np.ndarray, blob: bytes, n_ctx: int) -> None:
        """Hold `tokens` from a saved state instead of prefilling them."""
        self.close()
        ctx = self.model.context(n_ctx=max(n_ctx, len(tokens) + 1) + self.headroom, n_seq_max=self.n_seq,
                                 **self.options)
        try:
            ctx.state_set(0, blob)
            if ctx.pos_max(0) + 1 != len(tokens) or ctx.n_cells(0) != len(tokens):
                raise ValueError(f"the saved state holds {ctx.n_cells(0)} cells, not the {len(tokens)} tokens "
                                 "its header names")
        except BaseException:
            ctx.close()
            raise
        self.context, self.tokens, self.reused = ctx, np.asarray(tokens, np.int32).copy(), 0

    @property
    def kv_bytes(self) -> int:
        return 0 if self.context is None else self.context.kv_bytes(0)

    def close(self) -> None:
        if self.context is not None:
            self.context.close()
        self.context, self.tokens = None, np.empty(0, np.int32)



class KeptCache:
    """The target's KV of the document tokens a conversation's earlier
    questions kept with a prompt-side method: a later question prefills only
    the document tokens it keeps that none before it kept, then its part of
    the conversation.

    llama.cpp appends to a sequence only after its last position, so newly
    kept tokens follow the held ones instead of taking their places in the
    document: the target reads the kept runs in document order, one pass of
    it per question that added some. Held tokens stay while they number at
    most `growth` times the question's own selection from the document;
    past that, the question starts again from its own selection.

    Args:
        model, options: the target and its context options.
        doc_end: prompt positions before it are the document's (the same in
            every question's prompt); from it on, the conversation.
        growth: how many times a question's selection the held tokens may be.
    """

    def __init__(self, model, options: dict, doc_end: int, growth: float = 3.0):
        if not growth >= 1:
            raise ValueError(f"growth must be >= 1, not {growth}")
        self.cache = PrefixCache(model, options, n_seq=1)
        self.doc_end, self.growth = doc_end, growth
        self.held = np.empty(0, np.int32)  # document positions, in the order the context holds them

    @property
    def reused(self) -> int:
        """Tokens the last `take` found held."""
        return self.cache.reused

    def order(self, positions: np.ndarray) -> np.ndarray:
        """The kept prompt `positions` in the order the target reads them:
        the held document positions, the newly kept ones, the conversation's."""
        positions = np.asarray(positions, np.int32)
        doc, talk = positions[positions < self.doc_end], positions[positions >= self.doc_end]
        new = np.setdiff1d(doc, self.held).astype(np.int32)
        held = self.held
        if len(held) + len(new) > self.growth * len(doc):
            held, new = np.empty(0, np.int32), doc
        return np.concatenate([held, new, talk])

    def take(self, tokens: np.ndarray, order: np.ndarray, room: int):
        """The context, holding what it can of `tokens[order]` (all but its
        last token at most); the caller prefills the rest, then calls `hold`."""
        return self.cache.take(tokens[order], 1, len(order) + room)

    def hold(self, tokens: np.ndarray, order: np.ndarray) -> None:
        """The context now holds `tokens[order]` (a prefill succeeded)."""
        self.cache.hold(tokens[order])
        self.held = order[order < self.doc_end].copy()

    def forget(self) -> None:
        """After a failed prefill the context holds only what `take` reused."""
        self.cache.forget()
        self.held = self.held[: self.cache.reused]

    @property
    def kv_bytes(self) -> int:
        return self.cache.kv_bytes

    def close(self) -> None:
        self.cache.close()
        self.held = np.empty(0, np.int32)


class PrefixPool:
    """Up to `slots` prefix caches of one model, for prompts from different
    conversations (a server's requests), shared by threads. A prompt takes
    the free cache holding its longest common prefix, provided that keeps
    at least half of what the cache holds; otherwise a new cache while there
    are fewer than `slots`, else the least recently used free one. A taken
    cache is the taker's until `give_back`; with every cache taken, `take`
    returns None (the prompt runs uncached).

    With a `store` (`store.StateStore`) the caches outlive the process: a
    taken cache is loaded from the saved state that holds more of the
    prompt, and `give_back` saves what a cache read since."""

    def __init__(self, model, options: dict, slots: int, n_seq: int = 2, store=None):
        if slots < 1:
            raise ValueError(f"a prefix pool needs at least one slot, not {slots}")
        self.model, self.options, self.slots, self.n_seq = model, options, slots, n_seq
        self.store = store
        self._caches: list[PrefixCache] = []  # least recently used first
        self._taken: set = set()
        self._saving: set = set()  # taken, until their state is saved
        self._lock = threading.Condition()

    def cached_tokens(self, tokens: np.ndarray) -> int:
        """Prompt tokens a `take` of `tokens` would find cached now (in a
        cache, or in a saved state it would load)."""
        with self._lock:
            cached = self._best(tokens)[1]
        saved = self.store.find(tokens)[0] if self.store is not None else 0
        return saved if saved >= cached + STATE_MIN_GAIN else cached

    def _best(self, tokens: np.ndarray) -> tuple:
        """(the free cache, or one being saved, holding the longest common
        prefix, provided it keeps at least half of what the cache holds, or
        None; that prefix)."""
        best, shared = None, 0
        for cache in self._caches:
            if id(cache) not in self._taken or id(cache) in self._saving:
                n = common_prefix(cache.tokens, tokens)
                if n > shared and 2 * n >= len(cache.tokens):
                    best, shared = cache, n
        return best, shared

    def take(self, tokens: np.ndarray) -> Optional[PrefixCache]:
        with self._lock:
            best = self._best(tokens)[0]
            while best is not None and id(best) in self._saving:  # the next turn waits for the save, not a re-read
                self._lock.wait()
                best = self._best(tokens)[0]
            free = [c for c in self._caches if id(c) not in self._taken]
            if best is None:
                if len(self._caches) < self.slots:
                    best = PrefixCache(self.model, self.options, self.n_seq)
                elif free:
                    best = free[0]
                else:
                    return None
            if best in self._caches:
                self._caches.remove(best)
            self._caches.append(best)
            self._taken.add(id(best))
        if self.store is not None:  # the taker's now: loaded outside the lock
            self._restore(best, tokens)
        return best

    def give_back(self, cache: Optional[PrefixCache]) -> None:
        if cache is None:
            return
        try:
            if self.store is not None:
                with self._lock:
                    self._saving.add(id(cache))
                self._persist(cache)
        finally:
            with self._lock:
                self._saving.discard(id(cache))
                self._taken.discard(id(cache))
                self._lock.notify_all()

    def _restore(self, cache: PrefixCache, tokens: np.ndarray) -> None:
        """Load the saved state that holds more of `tokens` than `cache`."""
        n, path, saved = self.store.find(tokens)
        if n < common_prefix(cache.tokens, tokens) + STATE_MIN_GAIN:
            return
        blob = self.store.load(path, saved)
        if blob is None:
            return
        try:
            cache.load(saved, blob, len(tokens))
        except (ValueError, RuntimeError) as e:  # the cache is empty again: the prompt is read cold
            log.warning("a saved draft state could not be loaded (%s): %s", path, e)

    def _persist(self, cache: PrefixCache) -> None:
        """Save what `cache` holds where the saved states lack enough of it."""
        n = len(cache.tokens)
        if n < STATE_MIN_GAIN or n - self.store.find(cache.tokens)[0] < STATE_MIN_GAIN:
            return
        try:
            self.store.save(cache.tokens, cache.state(n))
        except (OSError, ValueError, RuntimeError) as e:
            log.warning("the draft's state was not saved: %s", e)

    @property
    def kv_bytes(self) -> int:
        return sum(c.kv_bytes for c in self._caches)

    def close(self) -> None:
        for cache in self._caches:
            cache.close()
        self._caches.clear()
