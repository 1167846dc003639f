from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .. import selection
from .base import PromptMethod


@dataclass
class HeadTail(PromptMethod):
    """Keep the beginning and the end of the prompt, drop the middle: the
    baseline that needs no model at all."""

    name: ClassVar[str] = "headtail"

    def score(self, draft, n):
        return np.zeros(n, np.float32)

    def select(self, scores, budget, protected):
        return selection.select_head_tail(len(scores), budget, protected)
