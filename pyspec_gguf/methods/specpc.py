from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .. import selection
from ..passes import DraftNeeds
from ..scoring import REDUCTIONS, aggregate
from .base import PromptMethod


@dataclass
class SpecPC(PromptMethod):
    """Prompt compression scored by the draft's attention (SpecPC, Galim et al.
    2025, "Draft-based Approximate Inference for LLMs").

    The draft prefills the prompt; the attention of its last `window` queries
    (weighted linearly 0..1, oldest to newest, if `weighted`) and of each of
    its `lookahead` - 1 drafted tokens, in layers >= `start_layer`, reduced
    over heads and rows by `reduction` and over layers and steps by max,
    scores every prompt token. Scores are max-pooled with `kernel`, the top
    tokens widened to `neighbours` nearest tokens, and the target prefills
    only the kept tokens (positions renumbered).

    Args: window=64, kernel=64, neighbours=64, pool="max", reduction="max",
    lookahead=64, start_layer=8, weighted=True. The paper's Qwen defaults
    but for the lookahead (its 1: the prompt's last queries only): the
    drafted answer's queries find the facts an answer lists after its first
    (bench/README.md, "How far SpecPC looks ahead": +0.15 accuracy at 8K
    tokens, budget 1024, for ≤ 4% of the draft's time).
    """

    name: ClassVar[str] = "specpc"
    uses_draft: ClassVar[bool] = True
    window: int = 64
    kernel: int = 64
    neighbours: int = 64
    pool: str = "max"
    reduction: str = "max"
    lookahead: int = 64
    start_layer: int = 8
    weighted: bool = True

    def validate(self) -> None:
        self._positive(window=self.window, kernel=self.kernel, neighbours=self.neighbours, lookahead=self.lookahead)
        self._non_negative(start_layer=self.start_layer)
        self._choice("pool", self.pool, selection.POOLS)
        self._choice("reduction", self.reduction, REDUCTIONS)

    def draft_needs(self) -> DraftNeeds:
        return DraftNeeds(window=self.window, weighted=self.weighted, lookahead=self.lookahead,
                          step_rows=self.lookahead > 1, start_layer=self.start_layer, reduction=self.reduction)

    def score(self, draft, n):
        score = aggregate(draft.rows, "max")
        for step in draft.steps[: self.lookahead - 1]:
            score = np.maximum(score, aggregate(step, "max"))
        return score

    def select(self, scores, budget, protected):
        return selection.select_specpc(scores, budget, self.window, self.kernel, self.neighbours, self.pool,
                                       protected)
