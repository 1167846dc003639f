"""What a method is: it scores prompt tokens; the shared selection rules and
the session's pipelines do the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np


# KV methods keep one set of entries for all layers and heads ("token") or
# one per layer and KV head ("head", by state rewrite); see the README.
GRANULARITIES = ("head", "token")
DEFAULT_GRANULARITY = "token"


@dataclass
class Method:
    """Base of every method. `stage` says where it prunes: 'prompt' (the
    target prefills only the kept tokens), 'kv' (the target prefills all and
    its KV cache is pruned), or 'none'."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "none"
    uses_draft: ClassVar[bool] = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        pass

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
    """Prompt compression: score[i] says how much token i is worth keeping;
    `select` picks the tokens the target will see."""

    stage: ClassVar[str] = "prompt"

    def score_prompt(self, job) -> np.ndarray:
        raise NotImplementedError

    def select(self, scores: np.ndarray, budget: int, protected: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def select_per_head(self, scores: np.ndarray, budget: int, protected: np.ndarray) -> np.ndarray:
        """scores [layer, kv_head, key] -> kept [layer, kv_head, C]."""
        raise NotImplementedError(f"{self.name} has no per-head selection")


@dataclass
class KVMethod(Method):
    """KV-cache dropping: the target prefills the prompt (plus any lookahead
    tokens) while the last `window` + 1 prompt queries and the lookahead
    queries are captured; `select` picks the KV entries of x[0, N-1) to keep."""

    stage: ClassVar[str] = "kv"
    captures: ClassVar[bool] = True
    granularity: ClassVar[str] = "token"  # methods that can keep per-head sets make it a field

    def lookahead_tokens(self, job) -> np.ndarray:
        """Tokens appended after the prompt as extra observation queries."""
        return np.empty(0, np.int32)

    def select(self, scores: np.ndarray, budget: int, protected: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def select_per_head(self, scores: np.ndarray, budget: int, protected: np.ndarray) -> np.ndarray:
        """scores [layer, kv_head, key] -> kept [layer, kv_head, C]."""
        raise NotImplementedError(f"{self.name} has no per-head selection")
