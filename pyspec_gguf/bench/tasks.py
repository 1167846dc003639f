"""RULER-style long-context tasks, generated from a seed at a length in tokens.

Needle tasks, variable tracking and question answering hide their facts in
real prose (the Paul Graham essays RULER also uses); the word-counting tasks
are word lists, as in RULER. Each task gives chat messages and the strings
the answer must contain; the score is the fraction of them found, as RULER
scores.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from . import haystack


@dataclass
class Task:
    name: str
    messages: list
    expected: list
    # enough for the answer even when a chat model first restates the prompt's
    # answer lead and then numbers the items, one per line
    max_tokens: int = 32

    def score(self, answer: str) -> float:
        return sum(e.lower() in answer.lower() for e in self.expected) / len(self.expected)


KEYS = ["crimson-harbor", "silent-orchard", "golden-lantern", "frozen-meadow", "hidden-canyon", "velvet-compass",
        "amber-falcon", "quiet-glacier", "rusty-anchor", "misty-valley", "copper-kettle", "lunar-garden",
        "paper-tiger", "marble-bridge", "scarlet-river", "hollow-oak"]


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _with_facts(model, n_tokens: int, facts: list, rng: random.Random, reserve: int) -> str:
    """Prose of about n_tokens - reserve tokens with each fact put at a
    sentence boundary at a random depth."""
    doc = haystack.fit_tokens(model, max(64, n_tokens - reserve - sum(len(f) // 3 for f in facts)))
    for fact in facts:
        at = int(len(doc) * rng.uniform(0.05, 0.95))
        cut = doc.rfind(". ", 0, at)
        cut = cut + 2 if cut > 0 else 0
        doc = doc[:cut] + fact + " " + doc[cut:]
    return doc


def _user(content: str) -> list:
    return [{"role": "user", "content": content}]


NEEDLE_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                "I will quiz you about the numbers afterwards.\n")


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def niah_single(model, n_tokens: int, seed: int) -> Task:
    """One magic number hidden at a random depth."""
    rng = random.Random(seed)
    key, value = rng.choice(KEYS[:8]), _number(rng)
    doc = haystack.fit_tokens(model, n_tokens - 80)
    cut = doc.rfind(". ", 0, int(len(doc) * rng.uniform(0.1, 0.9)))
    cut = cut + 2 if cut > 0 else 0
    doc = doc[:cut] + _needle(key, value) + " " + doc[cut:]
    q = f"What is the special magic number for {key} mentioned in the provided text?"
    return Task("niah_single", _user(f"{NEEDLE_INTRO}{doc}\n{q} The special magic number for {key} mentioned in "
                                     f"the provided text is"), [value])


def niah_multikey(model, n_tokens: int, seed: int) -> Task:
    """Four magic numbers under different keys; one is asked."""
    rng = random.Random(seed)
    keys = rng.sample(KEYS, 4)
    values = [_number(rng) for _ in keys]
    doc = _with_facts(model, n_tokens, [_needle(k, v) for k, v in zip(keys, values)], rng, 100)
    q = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
    return Task("niah_multikey", _user(f"{NEEDLE_INTRO}{doc}\n{q} The special magic number for {keys[0]} "
                                       f"mentioned in the provided text is"), [values[0]])


def niah_multivalue(model, n_tokens: int, seed: int) -> Task:
    """One key with four magic numbers; all are asked."""
    rng = random.Random(seed)
    key = rng.choice(KEYS)
    values = [_number(rng) for _ in range(4)]
    doc = _with_facts(model, n_tokens, [_needle(key, v) for v in values], rng, 110)
    q = f"What are all the special magic numbers for {key} mentioned in the provided text?"
    return Task("niah_multivalue", _user(f"{NEEDLE_INTRO}{doc}\n{q} The special magic numbers for {key} mentioned "
                                         f"in the provided text are"), values, max_tokens=96)


def niah_multiquery(model, n_tokens: int, seed: int) -> Task:
    """Four magic numbers under different keys; two are asked at once."""
    rng = random.Random(seed)
    keys = rng.sample(KEYS, 4)
    values = [_number(rng) for _ in keys]
    doc = _with_facts(model, n_tokens, [_needle(k, v) for k, v in zip(keys, values)], rng, 120)
    q = f"What are the special magic numbers for {keys[0]} and {keys[1]} mentioned in the provided text?"
    return Task("niah_multiquery", _user(f"{NEEDLE_INTRO}{doc}\n{q} The special magic numbers for {keys[0]} and "
                                         f"{keys[1]} mentioned in the provided text are"), values[:2], max_tokens=64)


def make_conversation(model, n_tokens: int, n_questions: int, seed: int) -> tuple:
    """A document to chat about: the essays with one magic number per
    question hidden under a key of its own. Returns (document text,
    [(question, expected number)])."""
    rng = random.Random(seed)
    keys = rng.sample(KEYS, n_questions)
    values = [_number(rng) for _ in keys]
    text = NEEDLE_INTRO + _with_facts(model, n_tokens, [_needle(k, v) for k, v in zip(keys, values)], rng,
                                      60 + 30 * n_questions)
    return text, [(f"What is the special magic number for {k} mentioned in the provided text?", v)
                  for k, v in zip(keys, values)]


def variable_tracking(model, n_tokens: int, seed: int) -> Task:
    """A chain of four assignments, VAR A = 12345, VAR B = VAR A, ..., in
    order through the text; asked which variables hold the value."""
    rng = random.Random(seed)
    names = rng.sample(["QXRTE", "BLMOP", "ZVKDA", "HNWUS", "PLYTR", "GMEXO", "CFRIN", "WDAKS"], 4)
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    doc = haystack.fit_tokens(model, n_tokens - 140)
    # the chain keeps its order: each assignment goes after the previous one
    bounds = sorted(rng.uniform(0.05, 0.95) for _ in chain)
    for fact, depth in zip(reversed(chain), reversed(bounds)):
        cut = doc.rfind(". ", 0, int(len(doc) * depth))
        cut = cut + 2 if cut > 0 else 0
        doc = doc[:cut] + fact + " " + doc[cut:]
    q = (f"Find all variables that are assigned the value {value} in the text above, directly or through "
         f"another variable.")
    return Task("variable_tracking", _user(f"Memorize and track the chain(s) of variable assignment hidden in the "
                                           f"following text.\n\n{doc}\nQuestion: {q} Answer: According to the chain(s) "
                                           f"of variable assignment in the text above, {len(names)} variables are "
                                           f"assigned the value {value}, they are:"), names, max_tokens=72)


@lru_cache(maxsize=1)
def _vocabulary() -> tuple:
    """Distinct lowercase words of the essays (4-10 letters), in a fixed order."""
    words = Counter(re.findall(r"\b[a-z]{4,10}\b", haystack.text()))
    return tuple(sorted(words))


def _fit_items(model, n_tokens: int, build: Callable[[int], str]) -> str:
    """build(k) makes a text of k items; find the k that fills n_tokens."""
    k = max(8, n_tokens // 3)
    for _ in range(3):
        n = len(model.tokenize(build(k), add_special=False))
        k = max(8, int(k * n_tokens / max(n, 1)))
    return build(k)


def common_words(model, n_tokens: int, seed: int) -> Task:
    """RULER's common words extraction: ten words appear many times each (30
    in a long list, fewer in a short one, never under 3) in a numbered list
    of words that appear at most twice; name the ten."""
    rng = random.Random(seed)
    vocab = list(_vocabulary())
    rng.shuffle(vocab)
    common, filler = vocab[:10], [w for w in vocab[10:] for _ in range(2)]
    order = rng.random()

    def build(k):
        repeats = max(3, min(30, k // 40))
        words = [w for w in common for _ in range(repeats)] + filler[: max(0, k - 10 * repeats)]
        random.Random(order).shuffle(words)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))

    text = _fit_items(model, n_tokens - 150, build)
    return Task("common_words", _user(f"Below is a numbered list of words. In these words, some appear more often "
                                      f"than others. Memorize the ones that appear most often.\n{text}\nQuestion: "
                                      f"What are the 10 most common words in the above list? Answer: The top 10 "
                                      f"words that appear most often in the list are:"), common, max_tokens=96)


def frequent_words(model, n_tokens: int, seed: int) -> Task:
    """RULER's frequent words extraction: words drawn from a Zipf
    distribution (alpha 2); name the three most frequent."""
    rng = random.Random(seed)
    vocab = list(_vocabulary())
    rng.shuffle(vocab)
    weights = [1.0 / (rank + 1) ** 2 for rank in range(len(vocab))]
    draw = rng.random()
    top = []

    def build(k):
        words = random.Random(draw).choices(vocab, weights=weights, k=k)
        top[:] = [w for w, _ in Counter(words).most_common(3)]
        return " ".join(words)

    text = _fit_items(model, n_tokens - 150, build)
    return Task("frequent_words", _user(f"Read the following coded text and track the frequency of each coded word. "
                                        f"Find the three most frequently appeared coded words.\n{text}\n"
                                        f"Question: Do not provide any explanation. "
                                        f"What are the three most frequently appeared words in the above coded text? "
                                        f"Answer: According to the coded text above, the three most frequently "
                                        f"appeared words are:"), list(top), max_tokens=40)


PEOPLE = ["Margot Ellery", "Tobias Renwick", "Ines Calloway", "Viktor Asplund", "Hana Okafor", "Desmond Pryce",
          "Lucia Varga", "Anselm Whitlock", "Priya Castellan", "Rowan Fairbairn"]
CITIES = ["Tromso", "Valparaiso", "Ljubljana", "Hobart", "Windhoek", "Tbilisi", "Cusco", "Reykjavik", "Kochi",
          "Halifax"]
SUBJECTS = ["marine biology", "glassblowing", "medieval law", "volcanology", "violin making", "cartography",
            "beekeeping", "typography"]


def question_answering(model, n_tokens: int, seed: int) -> Task:
    """Facts about four invented people are told in passing; one question
    asks for a detail of one of them (the others are distractors)."""
    rng = random.Random(seed)
    people = rng.sample(PEOPLE, 4)
    cities = rng.sample(CITIES, 4)
    subjects = rng.sample(SUBJECTS, 4)
    facts = [f"In {rng.randint(1961, 1999)}, {p} moved to {c} to study {s}." for p, c, s in
             zip(people, cities, subjects)]
    doc = _with_facts(model, n_tokens, facts, rng, 120)
    q = f"To which city did {people[0]} move to study {subjects[0]}?"
    return Task("qa", _user(f"Answer the question based on the given documents.\n\nThe following are given "
                            f"documents.\n\n{doc}\n\nAnswer the question based on the given documents. Only give me "
                            f"the answer and do not output any other words.\n\nQuestion: {q}"), [cities[0]],
                max_tokens=16)


TASKS: dict[str, Callable[..., Task]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
    "qa": question_answering,
}


def make_task(name: str, model, n_tokens: int, seed: int) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name](model, n_tokens, seed)


# kept for the existing benchmarks
single_needle = niah_single
