from dataclasses import dataclass, fields
from typing import ClassVar

from .full import Full
from .specpc import SpecPC


@dataclass
class Auto(SpecPC):
    """Per prompt, `full` or `specpc` (with these options), whichever this
    machine is predicted to answer sooner (`pyspec_gguf.speed`): short
    prompts, and a document whose target already holds the conversation, go
    through `full`; long ones through `specpc`. Not a pass of its own: the
    session resolves it before any pass runs and names the choice in the
    answer's stats."""

    name: ClassVar[str] = "auto"

    def way(self, name: str):
        """The method `name` ("full" or "specpc") with this one's options."""
        if name == "full":
            return Full()
        return SpecPC(**{f.name: getattr(self, f.name) for f in fields(SpecPC) if f.init})
