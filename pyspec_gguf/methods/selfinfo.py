from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .. import selection
from ..passes import DraftNeeds
from .base import PromptMethod


@dataclass
class SelfInfo(PromptMethod):
    """Prompt compression by the draft's per-token self-information
    -log p(x_i | x_<i) (LLMLingua-1 style, at token level): surprising tokens
    are kept, predictable ones dropped. Needs no attention capture.

    Args: window=64 (the last tokens, always kept).
    """

    name: ClassVar[str] = "selfinfo"
    uses_draft: ClassVar[bool] = True
    window: int = 64

    def validate(self) -> None:
        self._non_negative(window=self.window)

    def draft_needs(self) -> DraftNeeds:
        return DraftNeeds(logprobs=True)

    def score(self, draft, n):
        # the first token has no context: keep it
        return np.concatenate([[np.inf], -draft.logprobs]).astype(np.float32)

    def select(self, scores, budget, protected):
        return selection.select_topk(scores, budget, self.window, kernel=1, protected=protected)
