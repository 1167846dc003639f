from dataclasses import dataclass
from typing import ClassVar

from .. import selection
from .base import KVMethod


@dataclass
class StreamingLLM(KVMethod):
    """KV-cache dropping that keeps `sinks` attention-sink tokens at the start
    and the most recent rest (StreamingLLM, Xiao et al. 2024).

    Args: sinks=4.
    """

    name: ClassVar[str] = "streamingllm"
    captures: ClassVar[bool] = False
    sinks: int = 4

    def validate(self) -> None:
        self._non_negative(sinks=self.sinks)

    def select(self, scores, budget, protected):
        return selection.select_sink_recent(len(scores), budget, self.sinks, protected)
