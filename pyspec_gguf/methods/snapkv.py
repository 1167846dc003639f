from dataclasses import dataclass
from typing import ClassVar

from .speckv import SpecKV


@dataclass
class SnapKV(SpecKV):
    """KV-cache dropping scored by the last prompt queries alone (SnapKV, Li
    et al. 2024): SpecKV's scoring with no lookahead, so no draft is needed.

    Args: window=32, kernel=7, pool="max", reduction="max", aggregation="max",
    granularity (see SpecKV).
    """

    name: ClassVar[str] = "snapkv"
    uses_draft: ClassVar[bool] = False
    lookahead: int = 0

    def validate(self) -> None:
        super().validate()
        if self.lookahead != 0:
            raise ValueError("snapkv: lookahead must be 0 (use speckv for drafted lookahead)")
