from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .. import selection
from ..scoring import aggregate, greedy_lookahead, prefill_with_capture
from .base import PromptMethod


@dataclass
class SpecPrefill(PromptMethod):
    """Prompt compression by the draft's lookahead attention, kept in whole
    chunks (SpecPrefill, Liu et al., ICML 2025).

    The draft drafts `lookahead` tokens; the attention of the last prompt
    token and of each drafted token, averaged over heads and layers, scores
    the prompt; chunks of `chunk` tokens are ranked by their mean score and
    kept whole, best first. The target sees the kept tokens at renumbered
    positions (llama.cpp cannot prefill at gapped positions).

    Args: lookahead=8, chunk=32, window=16 (last tokens always kept).
    """

    name: ClassVar[str] = "specprefill"
    uses_draft: ClassVar[bool] = True
    lookahead: int = 8
    chunk: int = 32
    window: int = 16

    def validate(self) -> None:
        self._non_negative(lookahead=self.lookahead, window=self.window)
        self._positive(chunk=self.chunk)

    def score_prompt(self, job) -> np.ndarray:
        draft, tokens = job.draft, job.tokens
        n = len(tokens)
        layers = np.arange(draft.n_layer)
        ctx = job.draft_context(n + self.lookahead + 8)
        with job.timer("draft_prefill"):
            score = aggregate(prefill_with_capture(ctx, tokens, layers, [n - 1], None, "sum",
                                                   progress=job.progress), "sum")
        with job.timer("lookahead"):
            job.draft_tokens, steps = greedy_lookahead(ctx, draft, self.lookahead, layers, "sum", n_keys=n)
        for step in steps:
            score = score + aggregate(step, "sum")
        return score / (1 + len(steps))

    def select(self, scores, budget, protected):
        return selection.select_chunks(scores, budget, self.chunk, self.window, protected)
