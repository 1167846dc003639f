"""What a method is: it declares what it reads from the draft's and the
target's passes (`pyspec_gguf.passes`) and scores prompt tokens from it; the
shared selection rules and the pipeline (`pyspec_gguf.pipeline`) do the rest.

A method has at most one prompt stage (the target sees only the kept
tokens) and one KV stage (the target's cache keeps only the kept entries),
applied in that order: a prompt method is its own prompt stage, a KV method
its own KV stage, and a cascade composes one of each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np

from ..passes import DraftNeeds, DraftPass, TargetNeeds, TargetPass
from ..scoring import aggregate

# KV methods keep one set of entries for all layers and heads ("token") or
# one per layer and KV head ("head", by state rewrite); see the README.
GRANULARITIES = ("head", "token")
DEFAULT_GRANULARITY = "token"


@dataclass
class Method:
    """Base of every method. `stage` says where it prunes: 'prompt' (the
    target prefills only the kept tokens), 'kv' (the target prefills all and
    its KV cache is pruned), 'cascade' (both, in that order) or 'none'."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "none"
    uses_draft: ClassVar[bool] = False
    answers_with_draft: ClassVar[bool] = False  # the draft, not the target, answers

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        pass

    @property
    def prompt_stage(self) -> Optional["PromptMethod"]:
        return None

    @property
    def kv_stage(self) -> Optional["KVMethod"]:
        return None

    @property
    def target_reads_prompt(self) -> bool:
        """The target prefills the whole prompt (`full` and the KV methods),
        so a prefix cache of its KV pays; prompt methods never make it."""
        return self.prompt_stage is None and not self.answers_with_draft

    def prompt_budget(self, budget: int) -> int:
        """Tokens the prompt stage keeps, for a final budget."""
        return budget

    def draft_needs(self) -> Optional[DraftNeeds]:
        """Everything this method reads from the draft, over its stages."""
        needs = [s.draft_needs() for s in (self.prompt_stage, self.kv_stage) if s is not None and s is not self]
        needs = [n for n in needs if n is not None]
        merged = needs[0] if needs else None
        for other in needs[1:]:
            merged = merged.merge(other)
            if merged is None:
                raise ValueError(f"{self.name}: its stages need different draft captures")
        return merged

    def _positive(self, **values) -> None:
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{self.name}: {key} must be a positive integer, not {value!r}")

    def _non_negative(self, **values) -> None:
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{self.name}: {key} must be an integer >= 0, not {value!r}")

    def _choice(self, key: str, value, allowed) -> None:
        if value not in allowed:
            raise ValueError(f"{self.name}: {key} must be one of {tuple(allowed)}, not {value!r}")


@dataclass
class PromptMethod(Method):
    """Prompt compression: `score` says how much each prompt token is worth
    keeping; `select` picks the tokens the target will see."""

    stage: ClassVar[str] = "prompt"

    @property
    def prompt_stage(self) -> "PromptMethod":
        return self

    def draft_needs(self) -> Optional[DraftNeeds]:
        return None

    def score(self, draft: Optional[DraftPass], n: int) -> np.ndarray:
        """One score per prompt token (n of them), from the draft's pass."""
        raise NotImplementedError

    def select(self, scores: np.ndarray, budget: int, protected: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass
class KVMethod(Method):
    """KV-cache dropping: the target prefills the prompt (plus any drafted
    lookahead tokens) while the last `window` + 1 prompt queries and the
    lookahead queries are captured; `select` picks the KV entries of
    x[0, N-1) to keep (x[N-2] is always kept, so the last prompt token
    decodes again at its own position N-1)."""

    stage: ClassVar[str] = "kv"
    captures: ClassVar[bool] = True
    granularity: ClassVar[str] = "token"  # methods that can keep per-head sets make it a field
    window: ClassVar[int] = 0
    reduction: ClassVar[str] = "max"
    aggregation: ClassVar[str] = "max"
    lookahead: ClassVar[int] = 0

    @property
    def kv_stage(self) -> "KVMethod":
        return self

    def draft_needs(self) -> Optional[DraftNeeds]:
        """The drafted tokens appended as observation queries, if any."""
        return DraftNeeds(lookahead=self.lookahead) if self.lookahead else None

    def target_needs(self) -> TargetNeeds:
        return TargetNeeds(self.window, self.reduction, self.lookahead, self.captures)

    def raw_scores(self, target: TargetPass) -> np.ndarray:
        """[layer, kv_head, key] over the keys x[0, N-1)."""
        return target.scores(self.reduction, lookahead=self.lookahead > 0)

    def score(self, target: TargetPass) -> np.ndarray:
        """One score per key, reduced over layers and heads."""
        return aggregate(self.raw_scores(target), self.aggregation)

    def select(self, scores: np.ndarray, budget: int, protected: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def select_per_head(self, scores: np.ndarray, budget: int, protected: np.ndarray) -> np.ndarray:
        """scores [layer, kv_head, key] -> kept [layer, kv_head, C]."""
        raise NotImplementedError(f"{self.name} has no per-head selection")
