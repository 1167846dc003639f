"""Answers of many (method, budget) variants of one prompt from one draft
pass and one target prefill: the accuracy side of the benchmark.

The draft prefills the prompt once, capturing SpecPC's scores, and drafts
the lookahead tokens SpecKV needs. The target prefills the prompt and the
drafted tokens once, capturing every layer's attention of the observation
window and the drafted tokens. Every KV variant then forks the prompt's KV
(`seq_cp`: shared cells, nothing copied) or rewrites it per head into a
small context; every prompt variant prefills only its kept tokens. The
selection rules are the methods' own (`pyspec_gguf.selection`), so a fork
answers as the method does alone; the runner checks that on one prompt per
context length against `SpecSession.generate`.
"""

from __future__ import annotations

import time

import numpy as np

from ..methods import SnapKV, SpecKV, SpecKVPC, SpecPC, StreamingLLM
from ..scoring import aggregate, greedy_lookahead, prefill_with_capture

# the benchmark's variants; "@head" / "@token" name a KV method's granularity
VARIANTS = ("full", "specpc", "speckv@head", "speckv@token", "snapkv@head", "snapkv@token", "speckv_pc",
            "streamingllm")


class PromptForks:
    def __init__(self, session, tokens: np.ndarray, protected: np.ndarray, max_tokens: int, progress=None):
        self.s, self.tokens, self.max_tokens = session, tokens, max_tokens
        self.n = n = len(tokens)
        self.protected = protected
        self.specpc, self.speckv, self.pc = SpecPC(), SpecKV(), SpecKVPC()
        self._draft_pass(progress)
        # the target's prompt KV (all but the last token) in sequence 0
        self.ctx = session.target.context(n_ctx=n + len(self.lookahead) + 2 * max_tokens + 16, n_seq_max=2,
                                          **session.context_options)
        self.raw = self._capture(self.ctx, tokens, progress)
        self._cascade_ctx = None
        self.rewrite_s = None  # seconds of the last per-head rewrite, into a fresh context

    # -- shared passes
    def _draft_pass(self, progress):
        s, m, n = self.s, self.specpc, self.n
        layers = np.arange(m.start_layer, s.draft.n_layer)
        w = min(m.window, n)
        with s.draft.context(n_ctx=n + self.speckv.lookahead + 8, **s.context_options) as ctx:
            rows = prefill_with_capture(ctx, self.tokens, layers, np.arange(n - w, n), np.linspace(0, 1, w),
                                        m.reduction, progress=progress)
            # the cascade's SpecPC stage also scores with the drafted tokens
            self.lookahead, steps = greedy_lookahead(ctx, s.draft, self.pc.lookahead, layers, m.reduction, n_keys=n)
        self.specpc_scores = aggregate(rows, "max")
        self.cascade_scores = self.specpc_scores
        for step in steps:
            self.cascade_scores = np.maximum(self.cascade_scores, aggregate(step, "max"))

    def _capture(self, ctx, tokens, progress):
        """Prefill tokens + lookahead capturing window and lookahead rows;
        leave tokens[:-1] in sequence 0. Returns {'snapkv', 'speckv'} raw
        scores [layer, kv_head, key] over tokens[:-1]."""
        n, w = len(tokens), min(self.speckv.window + 1, len(tokens))
        layers = np.arange(self.s.target.n_layer, dtype=np.int32)
        ctx.capture_arm(layers, np.arange(n - w, n + len(self.lookahead), dtype=np.int32), None, "max")
        try:
            ctx.prefill(tokens, want="none", progress=progress)
            window_rows, _ = ctx.capture_take()
            if len(self.lookahead):
                ctx.prefill(self.lookahead, want="none")
            lookahead_rows, _ = ctx.capture_take()
        finally:
            ctx.capture_disarm()
        ctx.seq_rm(0, n - 1, -1)
        window_rows = window_rows[..., : n - 1]
        return {"snapkv": window_rows, "speckv": np.maximum(window_rows, lookahead_rows[..., : n - 1])}

    # -- answering
    def _generate(self, ctx, tokens, seq):
        ctx.prefill(tokens[-1:], seq=seq)
        out = list(ctx.generate(self.max_tokens, seq=seq))
        return self.s.target.detokenize(out)

    def keep_answer(self, keep) -> tuple[str, int]:
        """The answer from the prompt KV entries `keep` (one set for all
        heads) and the last prompt token decoded again."""
        return self._by_token(self.ctx, self.tokens, keep)

    def per_head_answer(self, keep) -> tuple[str, int]:
        """The same with keep[layer, kv_head] kept per head (state rewrite)."""
        return self._by_head(self.ctx, self.tokens, keep)

    def _by_token(self, ctx, tokens, keep):
        ctx.seq_cp(0, 1)
        ctx.seq_keep_positions(1, keep)
        try:
            return self._generate(ctx, tokens, 1), len(keep) + 1
        finally:
            ctx.seq_rm(1, -1, -1)

    def _by_head(self, ctx, tokens, keep):
        n, c = len(tokens), keep.shape[-1]
        t0 = time.perf_counter()
        blob = ctx.state_rewrite(ctx.state_get(0), keep, np.arange(n - 1 - c, n - 1, dtype=np.int32))
        with self.s.target.context(n_ctx=c + self.max_tokens + 16, **self.s.context_options) as small:
            small.load_state(0, blob)
            self.rewrite_s = time.perf_counter() - t0
            return self._generate(small, tokens, 0), c + 1

    def _kv(self, ctx, tokens, raw, protected, budget, granularity, method):
        protected = protected[protected < len(tokens) - 1]
        if granularity == "head":
            return self._by_head(ctx, tokens, method.select_per_head(raw, budget, protected))
        return self._by_token(ctx, tokens, method.select(aggregate(raw, method.aggregation), budget, protected))

    def answer(self, variant: str, budget: int) -> tuple[str, int]:
        """(answer, KV cells the target held when decoding started)."""
        n, tokens = self.n, self.tokens
        name, _, gran = variant.partition("@")
        if name == "full" or n <= budget:
            return self._by_token(self.ctx, tokens, np.arange(n - 1, dtype=np.int32))
        if name in ("speckv", "snapkv"):
            method = SpecKV(granularity=gran) if name == "speckv" else SnapKV(granularity=gran)
            return self._kv(self.ctx, tokens, self.raw[name], self.protected, budget, gran, method)
        if name == "streamingllm":
            keep = StreamingLLM().select(np.zeros(n - 1), budget, self.protected[self.protected < n - 1])
            return self._by_token(self.ctx, tokens, keep)
        if name == "specpc":
            return self._prompt(self.specpc.select(self.specpc_scores, budget, self.protected))
        if name == "speckv_pc":
            return self._cascade(budget)
        raise ValueError(f"unknown variant {variant!r}")

    def _prompt(self, kept):
        with self.s.target.context(n_ctx=len(kept) + self.max_tokens + 16, **self.s.context_options) as ctx:
            ctx.prefill(self.tokens[kept])
            out = list(ctx.generate(self.max_tokens))
        return self.s.target.detokenize(out), len(kept)

    def _cascade(self, budget):
        """SpecKV-PC: SpecPC to max(pc_budget, budget) tokens, then SpecKV's
        selection on the target's capture of those tokens."""
        pc_budget = max(self.pc.pc_budget, budget)
        if self.n <= pc_budget:
            kept, scores = np.arange(self.n, dtype=np.int32), self.raw["speckv"]
            ctx, tokens = self.ctx, self.tokens
        else:
            kept = self.pc.prompt_stage.select(self.cascade_scores, pc_budget, self.protected)
            tokens = self.tokens[kept]
            if self._cascade_ctx is None or self._cascade_ctx[0] != pc_budget:
                if self._cascade_ctx is not None:
                    self._cascade_ctx[1].close()
                c = self.s.target.context(n_ctx=len(kept) + len(self.lookahead) + 2 * self.max_tokens + 16,
                                          n_seq_max=2, **self.s.context_options)
                self._cascade_ctx = (pc_budget, c, self._capture(c, tokens, None)["speckv"])
            _, ctx, scores = self._cascade_ctx
        if len(tokens) <= budget:
            return self._by_token(ctx, tokens, np.arange(len(tokens) - 1, dtype=np.int32))
        protected = np.flatnonzero(np.isin(kept, self.protected))
        method = self.pc.kv_stage
        return self._kv(ctx, tokens, scores, protected, budget, method.granularity, method)

    def close(self):
        self.ctx.close()
        if self._cascade_ctx is not None:
            self._cascade_ctx[1].close()
