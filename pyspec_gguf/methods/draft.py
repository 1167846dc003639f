from dataclasses import dataclass
from typing import ClassVar

from .base import Method


@dataclass
class DraftOnly(Method):
    """The draft model answers alone (if it is as good, the target is moot)."""

    name: ClassVar[str] = "draft"
    uses_draft: ClassVar[bool] = True
    answers_with_draft: ClassVar[bool] = True
