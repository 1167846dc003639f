from dataclasses import dataclass
from typing import ClassVar

from .. import selection
from ..scoring import REDUCTIONS
from .base import DEFAULT_GRANULARITY, GRANULARITIES, KVMethod


@dataclass
class SpecKV(KVMethod):
    """KV-cache dropping guided by a drafted answer (SpecKV, Galim et al.
    2025, "Draft-based Approximate Inference for LLMs").

    The draft drafts `lookahead` tokens; the target prefills the prompt and
    the drafted tokens; the attention of the last `window` + 1 prompt queries
    and of the drafted tokens, reduced over query rows and the query heads of
    each KV group by `reduction`, score each prompt KV entry per layer and
    KV head. With granularity="head" (the paper's rule) every layer and KV
    head keeps its own top entries; with "token" the scores are first
    reduced over layers and heads by `aggregation` and one set is kept for
    all. Scores are pooled with `kernel` (odd); the top `budget` - `window`
    entries and the window are kept, everything else (the last prompt token
    and the drafted tokens too) is dropped; the last prompt token is decoded
    again at its position.

    Args: window=32, kernel=7, pool="max", reduction="max", aggregation="max",
    granularity=DEFAULT_GRANULARITY, lookahead=64 (the paper uses the task's
    answer length).
    """

    name: ClassVar[str] = "speckv"
    uses_draft: ClassVar[bool] = True
    window: int = 32
    kernel: int = 7
    pool: str = "max"
    reduction: str = "max"
    aggregation: str = "max"
    granularity: str = DEFAULT_GRANULARITY
    lookahead: int = 64

    def validate(self) -> None:
        self._positive(window=self.window)
        self._non_negative(lookahead=self.lookahead)
        self._positive(kernel=self.kernel)
        if self.kernel % 2 == 0:
            raise ValueError(f"{self.name}: kernel must be odd, not {self.kernel}")
        self._choice("pool", self.pool, selection.POOLS)
        self._choice("reduction", self.reduction, REDUCTIONS)
        self._choice("aggregation", self.aggregation, REDUCTIONS)
        self._choice("granularity", self.granularity, GRANULARITIES)

    def select(self, scores, budget, protected):
        return selection.select_topk(scores, budget, self.window, self.kernel, self.pool, protected)

    def select_per_head(self, scores, budget, protected):
        return selection.select_topk_per_head(scores, budget, self.window, self.kernel, self.pool, protected)
