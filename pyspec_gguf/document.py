"""Chat with a long document: the draft reads it once, each question after
costs the question.

    with SpecSession() as s:
        doc = s.document("report.pdf")             # the draft reads it once
        print(doc.ask("What was the budget?").text)
        print(doc.ask("And who approved it?").text)  # the history stays in the prompt

Every question is a prompt in the model's chat template: the document and
the first question, then the earlier answers and questions, then the new
one. The draft keeps the KV of the last prompt and reuses it up to the
longest common token prefix (`PrefixCache`), so it prefills only the new
question (and recomputes the last `window` queries, whose attention it
captures over the cached keys). Two ways to answer:

- prompt side (`specpc`, `speckv_pc`, `specprefill`, ...): the target never
  holds the document; per question it prefills only the kept tokens. With
  `reuse_kept`, it holds the document tokens earlier questions kept and
  prefills only those no question kept before (`prefix.KeptCache`).
- KV side (`speckv`, `snapkv`, `full`, ...): the target prefills the document
  once and keeps it too; per question it scores against it, and the answer
  decodes from a compacted copy of the kept entries (`full`: from the whole
  cache), so the cached document stays whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from ._log import logger as log
from . import speculate
from .engine import Sampling
from .methods import Method
from .passes import Clock, DraftNeeds, draft_pass
from .pipeline import Caches
from .prefix import KeptCache, PrefixCache, cached_tokens, common_prefix
from .store import StateFileError, read_state, state_path, write_state

INSTRUCTION = "Answer the question about the text above."


def first_turn(text: str, question: str) -> str:
    """The first user message: the document, then the question."""
    return f"{text}\n\n{INSTRUCTION}\nQuestion: {question}"


def later_turn(question: str) -> str:
    return f"Question: {question}"


def conversation(text: str, turns: list, question: str) -> list:
    """The chat messages of a question about `text` after the earlier
    (question, answer) `turns`: the document goes with the first question."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty")
    questions = [q for q, _ in turns] + [question]
    messages = [{"role": "user", "content": first_turn(text, questions[0])}]
    for (_, answer), nxt in zip(turns, questions[1:]):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": later_turn(nxt)}]
    return messages


def question_protect(model, question: str) -> int:
    """Tokens at the end of a prompt that are always kept: the question and
    the few around it."""
    return len(model.tokenize(question, add_special=False)) + 16


class Document:
    """A document read once by the draft, asked many questions.

    Made by `SpecSession.document` from a source, or from text already
    read (`sources.read_source`). `turns` holds the conversation so far
    (question, answer); `last` the Result of the last answer. With
    `reuse_kept`, a prompt-side question's target keeps the KV of the
    document tokens kept so far, for the next question to add to.
    """

    def __init__(self, session, text: str, name: str = "text",
                 progress: Optional[Callable[[int, int], None]] = None, cache: bool = True, read: bool = True,
                 reuse_kept: bool = False):
        self.session, self.text, self.name = session, text, name
        self.reuse_kept = reuse_kept
        self.turns: list[tuple[str, str]] = []
        self.last = None
        self.prefix = self._prefix()
        session.check_fits(len(self.prefix), 1)
        self.read_seconds, self.loaded_from = 0.0, None
        self._draft = self._target = self._kept = None
        if session.draft is not None:
            self._draft = PrefixCache(session.draft, session.context_options)
            if read:  # else the first question that needs the draft reads it
                self._read(progress, cache)

    # ------------------------------------------------------------ questions

    def messages(self, question: str) -> list:
        """The chat messages of the next question: the conversation so far,
        then `question`."""
        return conversation(self.text, self.turns, question)

    def protect_last(self, question: str) -> int:
        return question_protect(self.session.target, question)

    def ask(self, question: str, method: Union[str, Method] = "auto", budget: Union[int, float] = 1024,
            max_tokens: int = 256, stream: bool = False, sampling: Sampling = Sampling(),
            progress: Optional[Callable[[int, int], None]] = None, speculative: str = speculate.DEFAULT,
            **method_options):
        """Answer `question` in the conversation; the answer joins it. Same
        arguments and result as `SpecSession.generate`; the default, "auto",
        takes `full` or `specpc`, whichever is predicted to answer sooner,
        counting what the draft's and the target's caches of the
        conversation already hold."""
        call = self.session.stream(self.messages(question), method, budget, max_tokens, sampling,
                                   self.protect_last(question), progress, method_options, caches=self,
                                   speculative=speculative)
        call.on_result = lambda result: self._answered(question, result)
        return call if stream else call.run()

    def _answered(self, question: str, result) -> None:
        self.turns.append((question, result.text))
        self.last = result

    def forget(self) -> None:
        """Start the conversation again (the document stays read)."""
        self.turns.clear()
        self.last = None

    def cached(self, tokens: np.ndarray) -> tuple:
        """(draft, target): what the conversation's caches hold of a
        question's prompt (`pipeline.Caches`)."""
        return cached_tokens(self._draft, tokens), cached_tokens(self._target, tokens)

    def caches(self, tokens: np.ndarray, method: Method) -> Caches:
        """The conversation's caches that `method`'s passes reuse."""
        return Caches(draft=self._draft, target=self._target_cache(method), kept=self._kept_cache(method))

    def _target_cache(self, method: Method) -> Optional[PrefixCache]:
        """Methods that read the whole prompt on the target (`full` and the
        KV methods) keep the target's KV of the document between questions;
        the prompt-side methods never make it."""
        if not method.target_reads_prompt:
            return None
        if self._target is None:
            self._target = PrefixCache(self.session.target, self.session.context_options, n_seq=2)
        return self._target

    def _kept_cache(self, method: Method) -> Optional[KeptCache]:
        """With `reuse_kept`, the prompt-side methods keep the target's KV of
        the document tokens they kept between questions."""
        if not self.reuse_kept or method.target_reads_prompt or method.answers_with_draft:
            return None
        if self._kept is None:
            self._kept = KeptCache(self.session.target, self.session.context_options, doc_end=len(self.prefix))
        return self._kept

    # ------------------------------------------------------------ reading

    def _prefix(self) -> np.ndarray:
        """The tokens every first question's prompt starts with: the
        template's header and the document (as the two prompts of different
        questions share them)."""
        a, b = (self.session.tokenize([{"role": "user", "content": first_turn(self.text, q)}]) for q in ("A", "B"))
        return a[: common_prefix(a, b)]

    def _read(self, progress, cache: bool) -> None:
        """The draft's KV of the document: loaded from a saved state where a
        valid one exists, else prefilled (and a refused file replaced)."""
        path = state_path(self.prefix, self.session.draft.path) if cache else None
        if path is not None and path.exists():
            try:
                clock = Clock()
                with clock.stage("draft_prefill"):
                    self.load(path)
                self.read_seconds = clock.times["draft_prefill"]
                return
            except (StateFileError, ValueError, RuntimeError) as e:
                log.warning("refusing the saved document state (%s); reading the document again", e)
        clock = Clock()
        draft_pass(self.session.draft, self.prefix, DraftNeeds(), self.session.context_options, clock, progress,
                   cache=self._draft)
        self.read_seconds = clock.times["draft_prefill"]
        if path is not None and path.exists():
            self.save(path)

    def load(self, path: Path) -> None:
        """Load the draft's KV of the document from a file `save` wrote
        (`store.StateFileError` where the file is not this document's on
        this draft)."""
        if self._draft is None:
            raise ValueError("a session without a draft model has no document state to load")
        blob = read_state(Path(path), self.prefix, self.session.draft.sha256())
        self._draft.load(self.prefix, blob, len(self.prefix))
        self.loaded_from = Path(path)

    def save(self, path: Optional[Path] = None) -> Path:
        """Save the draft's KV of the document (not the conversation) for the
        next `SpecSession.document` of the same document on the same draft.
        Returns the file's path (under the cache directory's documents/)."""
        if self._draft is None:
            raise ValueError("a session without a draft model has no document state to save")
        n = len(self.prefix)
        if common_prefix(self._draft.tokens, self.prefix) < n:
            draft_pass(self.session.draft, self.prefix, DraftNeeds(), self.session.context_options, Clock(),
                       cache=self._draft)
        path = path or state_path(self.prefix, self.session.draft.path)
        write_state(path, self.prefix, self._draft.state(n), self.session.draft.sha256(), self.name)
        return path

    # ------------------------------------------------------------ memory

    @property
    def kv_bytes(self) -> dict:
        """KV bytes the document's caches hold: {'draft': ..., 'target': ...}."""
        return {"draft": self._draft.kv_bytes if self._draft else 0,
                "target": sum(c.kv_bytes for c in (self._target, self._kept) if c is not None)}

    def close(self) -> None:
        for cache in (self._draft, self._target, self._kept):
            if cache is not None:
                cache.close()

    def __enter__(self) -> "Document":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
