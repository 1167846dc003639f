"""Answers of many (method, budget) variants of one prompt from one draft
pass and one target prefill: the accuracy side of the benchmark.

The pipeline (`pyspec_gguf.pipeline.Analysis`) runs the passes every
variant reads once, merged where their needs allow (one draft pass serves
SpecPC, SpecKV and the cascade; one target pass serves SpecKV, SnapKV and
StreamingLLM), and applies each variant as a fork: a KV variant keeps its
entries in a second sequence that shares the prompt's cells (`seq_cp`,
nothing copied) or rewrites them per head into a small context; a prompt
variant prefills only its kept tokens. The methods are built with their
real options, so a fork answers as `SpecSession.generate` does; the
runner's timed runs check it where a method is timed (each end-to-end run
must answer as its fork did: `timed_answer_matches` in the report).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..methods import KVMethod, make_method
from ..passes import AnswerContext, keep_one_set, keep_per_head
from ..pipeline import Analysis

# the benchmark's variants: every method at its default options, and the KV
# methods' other granularity ("@head": one set of entries per KV head)
VARIANTS = ("full", "specpc", "speckv", "snapkv", "speckv@head", "snapkv@head", "speckv_pc", "streamingllm",
            "specprefill", "selfinfo", "headtail", "draft")


class PromptForks:
    """One prompt analysed once for `variants` (method names, with
    `options[name]` as their options, or a dict of label: Method);
    `answer` applies one at a budget."""

    def __init__(self, session, tokens: np.ndarray, protected: np.ndarray, max_tokens: int,
                 variants=VARIANTS, options: Optional[dict] = None, progress=None):
        self.s, self.tokens, self.max_tokens = session, tokens, max_tokens
        options = options or {}
        if isinstance(variants, dict):
            self.methods = dict(variants)
        else:
            self.methods = {v: make_method(v, **options.get(v, {})) for v in variants}
        self.analysis = Analysis(session, tokens, protected, max_tokens, list(self.methods.values()), fork=True,
                                 progress=progress)

    def answer(self, variant: str, budget: int) -> tuple[str, int, int]:
        """(answer, KV cells the answering model held when decoding started,
        its KV bytes per cell)."""
        prepared = self.analysis.prepare(self.methods[variant], budget)
        return (self._generate(prepared.answer, prepared.model), prepared.cells,
                prepared.model.kv_bytes_per_token)

    # -- explicit selections over the prompt's own target pass (the
    #    aggregation and granularity studies choose the kept entries)

    def raw_scores(self, method: KVMethod) -> np.ndarray:
        """[layer, kv_head, key] scores of `method` over x[0, N-1)."""
        return method.raw_scores(self._target(method))

    def answer_kept(self, method: KVMethod, keep: np.ndarray) -> tuple[str, int]:
        """The answer from the prompt KV entries `keep`, one set for all heads."""
        answer = keep_one_set(self._target(method), keep, self.analysis.clock, self.analysis.room, "share")
        return self._generate(answer), answer.cells

    def answer_per_head(self, method: KVMethod, keep: np.ndarray) -> tuple[str, int]:
        """The same with keep[layer, kv_head] kept per head (state rewrite)."""
        answer = keep_per_head(self._target(method), keep, self.analysis.clock, self.analysis.room, copy=True,
                               model=self.s.target, options=self.s.context_options)
        return self._generate(answer), answer.cells

    def _target(self, method: KVMethod):
        return self.analysis.target(np.arange(len(self.tokens), dtype=np.int32), method.target_needs())

    def _generate(self, answer: AnswerContext, model=None) -> str:
        try:
            out = list(answer.context.generate(self.max_tokens, seq=answer.seq))
        finally:
            answer.close()
        return (model or self.s.target).detokenize(out)

    def close(self):
        self.analysis.close()
