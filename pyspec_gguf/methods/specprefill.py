from dataclasses import dataclass
from typing import ClassVar

from .. import selection
from ..passes import DraftNeeds
from ..scoring import aggregate
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

    def draft_needs(self) -> DraftNeeds:
        # the last prompt token's row, and each drafted token's
        return DraftNeeds(window=1, lookahead=self.lookahead, step_rows=True, reduction="sum")

    def score(self, draft, n):
        steps = draft.steps[: max(0, self.lookahead - 1)]
        score = aggregate(draft.rows, "sum")
        for step in steps:
            score = score + aggregate(step, "sum")
        return score / (1 + len(steps))

    def select(self, scores, budget, protected):
        return selection.select_chunks(scores, budget, self.chunk, self.window, protected)
