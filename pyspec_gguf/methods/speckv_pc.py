from dataclasses import dataclass, field
from typing import ClassVar

from .base import DEFAULT_GRANULARITY, Method
from .speckv import SpecKV
from .specpc import SpecPC


@dataclass
class SpecKVPC(Method):
    """The cascade (SpecKV-PC, Galim et al. 2025): SpecPC compresses the
    prompt to max(`pc_budget`, budget) tokens with one draft pass that also
    drafts the answer; SpecKV then drops the target's KV to the final budget,
    using the drafted tokens as its lookahead. A composition of the two
    methods' stages, nothing of its own.

    Args: pc_budget=2048, kernel=32 and neighbours=32 for the SpecPC stage,
    lookahead=64, and SpecKV's window=32, kv_kernel=7, granularity.
    """

    name: ClassVar[str] = "speckv_pc"
    stage: ClassVar[str] = "cascade"
    uses_draft: ClassVar[bool] = True
    pc_budget: int = 2048
    kernel: int = 32
    neighbours: int = 32
    lookahead: int = 64
    window: int = 32
    kv_kernel: int = 7
    granularity: str = DEFAULT_GRANULARITY
    pc: SpecPC = field(init=False, repr=False)
    kv: SpecKV = field(init=False, repr=False)

    def validate(self) -> None:
        self._positive(pc_budget=self.pc_budget)
        # the SpecPC stage scores with the drafted tokens too (lookahead > 1)
        self.pc = SpecPC(kernel=self.kernel, neighbours=self.neighbours, lookahead=max(1, self.lookahead))
        self.kv = SpecKV(window=self.window, kernel=self.kv_kernel, lookahead=self.lookahead,
                         granularity=self.granularity)

    @property
    def prompt_stage(self) -> SpecPC:
        return self.pc

    @property
    def kv_stage(self) -> SpecKV:
        return self.kv

    def prompt_budget(self, budget: int) -> int:
        # compress the prompt no further than the final budget needs
        return max(self.pc_budget, budget)
