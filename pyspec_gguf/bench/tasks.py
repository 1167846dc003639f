"""RULER-style long-context tasks over the Paul Graham essays, generated
from a seed. Each task gives chat messages and the strings the answer must
contain; scoring is the fraction of them found (as RULER does)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .. import haystack


@dataclass
class Task:
    name: str
    messages: list
    expected: list
    question: str

    def score(self, answer: str) -> float:
        return sum(e.lower() in answer.lower() for e in self.expected) / len(self.expected)


def _insert(text: str, needle: str, depth: float) -> str:
    """Put `needle` at a sentence boundary near `depth` (0..1) of `text`."""
    at = int(len(text) * depth)
    cut = text.rfind(". ", 0, at)
    cut = cut + 2 if cut > 0 else 0
    return text[:cut] + needle + " " + text[cut:]


def single_needle(model, n_tokens: int, seed: int) -> Task:
    """One 'special magic number' hidden at a random depth; asked at the end."""
    rng = random.Random(seed)
    key = rng.choice(["crimson-harbor", "silent-orchard", "golden-lantern", "frozen-meadow", "hidden-canyon",
                      "velvet-compass", "amber-falcon", "quiet-glacier"])
    value = str(rng.randint(1_000_000, 9_999_999))
    needle = f"One of the special magic numbers for {key} is: {value}."
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    doc = haystack.fit_tokens(model, n_tokens - 80)
    doc = _insert(doc, needle, rng.uniform(0.1, 0.9))
    content = (f"Some special magic numbers are hidden within the following text. Make sure to memorize them. "
               f"I will quiz you about the numbers afterwards.\n{doc}\n{question} "
               f"The special magic number for {key} mentioned in the provided text is")
    return Task("niah_single", [{"role": "user", "content": content}], [value], question)
