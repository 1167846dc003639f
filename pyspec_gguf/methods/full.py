from dataclasses import dataclass
from typing import ClassVar

from .base import Method


@dataclass
class Full(Method):
    """The whole prompt on the target: plain llama.cpp, the reference."""

    name: ClassVar[str] = "full"
