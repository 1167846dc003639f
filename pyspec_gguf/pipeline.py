"""One prompt through the passes, for one method or many.

`Analysis` runs the draft's pass and the target's passes a prompt needs,
each once, shared by every method that reads them; `prepare` applies one
method at one budget — its prompt stage (select, then the target sees only
the kept tokens), then its KV stage (select, then keep one set of KV entries
or one per layer and KV head) — and returns a context ready to sample the
answer from. `SpecSession.generate` prepares one method in place; the
benchmark prepares many variants of one prompt as forks of the same passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ._log import logger as log
from .methods import Method
from .prefix import KeptCache, PrefixCache, cached_tokens
from .passes import (AnswerContext, Clock, DraftNeeds, DraftPass, TargetNeeds, TargetPass, draft_pass,
                     keep_one_set, keep_per_head, prefill_answer_context, prefill_kept, target_pass)


@dataclass
class Prepared:
    """What `Analysis.prepare` made: the context to answer from, and what the
    answer is built from."""

    answer: AnswerContext
    model: object                        # the model that answers (the target, or the draft alone)
    kept: np.ndarray                     # prompt positions the answer is built from (per head: their union)
    scores: Optional[np.ndarray] = None  # the last stage's scores (per head: [layer, kv_head, key])
    kept_per_head: Optional[np.ndarray] = None  # [layer, kv_head, C] prompt positions

    @property
    def cells(self) -> int:
        """KV cells the answering model holds when decoding starts."""
        return self.answer.cells


class Analysis:
    """The passes over one prompt, run once each and shared.

    Args:
        session: the SpecSession (models and context options).
        tokens: the prompt's token ids; protected: positions always kept.
        max_tokens: the longest answer any `prepare` will decode.
        methods: every method that will be prepared, so that compatible
            needs share one draft pass and one target pass.
        fork: answers leave the passes' contexts whole (many variants of one
            prompt); otherwise the one answer takes them over (less memory).
        caches: prefix caches of the draft and the target (a document's
            conversation) that the passes over the whole prompt reuse and
            leave whole, and the target's cache of kept tokens that a
            prompt-side answer grows; any may be None.
        draft_room: cells the draft's context keeps free after the prompt
            (0: a pass's context closes when the pass ends), for the draft
            to draft the answer in (`draft_context`).
    """

    def __init__(self, session, tokens: np.ndarray, protected: np.ndarray, max_tokens: int,
                 methods: Sequence[Method], fork: bool = False, progress: Optional[Callable] = None,
                 clock: Optional[Clock] = None, caches: Optional["Caches"] = None, draft_room: int = 0):
        if any(m.name == "auto" for m in methods):
            raise ValueError("auto chooses a method per prompt: resolve it first (SpecSession.choose)")
        self.session, self.tokens, self.protected = session, tokens, protected
        self.caches = caches or Caches()
        self.used_draft_cache = self.used_target_cache = self.used_kept_cache = False
        self.room = 1 + max_tokens  # the last prompt token, decoded again, and the answer
        self.draft_room = draft_room
        self.fork, self.progress = fork, progress
        self.clock = clock or Clock()
        if getattr(progress, "stage", None) is not None:  # a display that names each stage as it begins
            self.clock.on_stage = progress.stage
        self._draft_plan = _merged([m.draft_needs() for m in methods], DraftNeeds.merge)
        self._target_plan = _merged([m.kv_stage.target_needs() for m in methods if m.kv_stage], TargetNeeds.merge)
        self._drafts: list[DraftPass] = []
        self._targets: dict = {}  # (kept positions, needs) -> TargetPass, kept for forks
        self._contexts: list = []  # every context a pass made, closed with the analysis

    # -------------------------------------------------------------- passes

    def draft(self, needs: DraftNeeds) -> DraftPass:
        """The draft's pass that serves `needs` (run on first use)."""
        for done in self._drafts:
            if needs.merge(done.needs) == done.needs:
                return done
        if self.session.draft is None:
            raise ValueError("this method needs a draft model; the session has none")
        planned = next((p for p in self._draft_plan if needs.merge(p) == p), needs)
        # log-probabilities of every token come from a fresh prefill
        cache = None if planned.logprobs else self.caches.draft
        self.used_draft_cache |= cache is not None
        done = draft_pass(self.session.draft, self.tokens, planned, self.session.context_options, self.clock,
                          self.progress, room=self.draft_room, cache=cache)
        if done.context is not None and cache is None:
            self._contexts.append(done.context)
        self._drafts.append(done)
        return done

    def draft_context(self):
        """The draft's context holding the whole prompt in sequence 0 (and
        after it whatever its pass drafted, `draft_room` cells free), from
        the pass that ran, or from a plain prefill now where none did."""
        if not self.draft_room:
            raise ValueError("the draft's context closes with its pass: make the Analysis with draft_room")
        done = next((d for d in self._drafts if d.context is not None), None) or self.draft(DraftNeeds())
        return done.context

    def target(self, positions: np.ndarray, needs: TargetNeeds) -> TargetPass:
        """The target's pass over the prompt tokens at `positions` that
        serves `needs` (run on first use; a fork's passes are kept)."""
        key = positions.tobytes()
        for (k, done_needs), done in self._targets.items():
            if k == key and needs.merge(done_needs) == done_needs:
                return done
        planned = next((p for p in self._target_plan if needs.merge(p) == p), needs)
        lookahead = np.empty(0, np.int32)
        if planned.captures and planned.lookahead:
            lookahead = self.draft(DraftNeeds(lookahead=planned.lookahead)).drafted[: planned.lookahead]
        # only a pass over the whole prompt is the cached prompt's continuation
        cache = self.caches.target if len(positions) == len(self.tokens) else None
        self.used_target_cache |= cache is not None
        done = target_pass(self.session.target, self.tokens[positions], planned, lookahead,
                           self.session.context_options, self.clock, self.room, n_seq=2 if self.fork else 1,
                           progress=self.progress, cache=cache)
        if cache is None:
            self._contexts.append(done.context)
        if self.fork or cache is not None:
            self._targets[(key, planned)] = done
        return done

    # -------------------------------------------------------------- apply

    def prepare(self, method: Method, budget: int) -> Prepared:
        """Run `method`'s stages at `budget` tokens; return the context to
        sample the answer from."""
        if method.answers_with_draft:
            return self._draft_answer()
        positions, scores = self.select_prompt(method, budget)
        kv = method.kv_stage
        if kv is None or len(positions) <= budget:
            return self._whole(positions, scores)
        protected = np.flatnonzero(np.isin(positions, self.protected))
        return self._kv_stage(kv, budget, positions, protected)

    def select_prompt(self, method: Method, budget: int) -> tuple:
        """The prompt positions `method`'s prompt stage keeps for a final
        `budget` (every position when it has none, or the prompt fits), and
        its scores (None then): what the target will see."""
        n = len(self.tokens)
        prompt, pc_budget = method.prompt_stage, method.prompt_budget(budget)
        if prompt is None or n <= pc_budget:
            return np.arange(n, dtype=np.int32), None
        needs = prompt.draft_needs()
        draft = self.draft(method.draft_needs()) if needs is not None else None
        with self.clock.stage("scoring"):
            scores = prompt.score(draft, n)
            return prompt.select(scores, pc_budget, self.protected), scores

    def _draft_answer(self) -> Prepared:
        """The draft answers alone, from its own pass's context."""
        if self.session.draft is None:
            raise ValueError("this method needs a draft model; the session has none")
        cache = self.caches.draft
        self.used_draft_cache |= cache is not None
        done = draft_pass(self.session.draft, self.tokens, DraftNeeds(), self.session.context_options,
                          self.clock, self.progress, room=self.room, cache=cache)
        kept = np.arange(len(self.tokens), dtype=np.int32)
        if cache is None:
            self._contexts.append(done.context)
            return Prepared(AnswerContext(done.context, cells=len(kept)), self.session.draft, kept)
        # the answer decodes after the cached prompt; the next pass drops it
        return Prepared(AnswerContext(done.context, cells=len(kept), leave=True), self.session.draft,
                        kept)

    def _whole(self, positions: np.ndarray, scores) -> Prepared:
        """The target answers from every token at `positions`: a fresh
        prefill of them, or, for the whole prompt in a fork or with a target
        cache, a shared fork of the prompt's own target pass (the one the KV
        variants share; a cached one holds the earlier turns already); for
        a selection with a cache of kept tokens, the tokens it does not hold
        prefilled after those it does."""
        target = self.session.target
        if self.caches.kept is not None and len(positions) < len(self.tokens):
            self.used_kept_cache = True
            answer, order = prefill_kept(self.caches.kept, self.tokens, positions, self.clock, self.room - 1,
                                         self.progress)
            return Prepared(answer, target, np.sort(order), scores)
        if (self.fork or self.caches.target is not None) and len(positions) == len(self.tokens):
            needs = _any_needs(self._targets, positions) or next(iter(self._target_plan), None)
            tp = self.target(positions, needs or TargetNeeds(captures=False))
            keep = np.arange(len(positions) - 1, dtype=np.int32)
            return Prepared(keep_one_set(tp, keep, self.clock, self.room, "share"), target, positions, scores)
        ctx = prefill_answer_context(target, self.tokens[positions], self.session.context_options, self.clock,
                                     self.room - 1, progress=self.progress)
        self._contexts.append(ctx)
        return Prepared(AnswerContext(ctx, cells=len(positions)), target, positions, scores)

    def _kv_stage(self, kv, budget: int, positions: np.ndarray, protected: np.ndarray) -> Prepared:
        """The target prefills the tokens at `positions` with the capture `kv`
        declares; the selection keeps `budget` entries (the last token's
        included), one set or one per head."""
        n = len(positions)
        tp = self.target(positions, kv.target_needs())
        # the KV of x[n-2] stays, so the last prompt token decodes at n-1
        protected = np.union1d(protected[protected < n - 1], [n - 2]).astype(np.int64)
        raw = kv.raw_scores(tp)
        target = self.session.target
        if kv.granularity == "head" and kv.captures:
            with self.clock.stage("scoring"):
                keep = kv.select_per_head(raw, budget, protected)
            try:
                answer = keep_per_head(tp, keep, self.clock, self.room, self.fork or tp.cached, target,
                                       self.session.context_options)
            except ValueError as e:
                log.warning("%s: per-head eviction unavailable (%s); keeping one set for all heads", kv.name, e)
            else:
                per_head = positions[keep]
                kept = np.append(np.unique(per_head), positions[n - 1]).astype(np.int32)
                return Prepared(answer, target, kept, raw, per_head)
        with self.clock.stage("scoring"):
            scores = kv.score(tp)
            keep = kv.select(scores, budget, protected)
        how = "share" if self.fork else "copy" if tp.cached else "in_place"
        answer = keep_one_set(tp, keep, self.clock, self.room, how, target, self.session.context_options)
        return Prepared(answer, target, positions[np.append(keep, n - 1)].astype(np.int32), scores)

    def close(self) -> None:
        for ctx in self._contexts:
            ctx.close()
        self._contexts.clear()
        self._targets.clear()


@dataclass
class Caches:
    """Prefix caches the passes over a whole prompt reuse, and the target's
    cache of kept tokens a prompt-side answer grows (None: none).

    A call takes these or any other source of caches with the same two
    methods (a document's conversation, the server's pools): `cached`, what
    they hold of a prompt before its method is known ("auto" predicts from
    it), and `caches`, the ones the chosen method's passes use."""

    draft: Optional[PrefixCache] = None
    target: Optional[PrefixCache] = None
    kept: Optional[KeptCache] = None

    def cached(self, tokens: np.ndarray) -> tuple:
        """(draft, target): the prompt tokens each cache already holds."""
        return cached_tokens(self.draft, tokens), cached_tokens(self.target, tokens)

    def caches(self, tokens: np.ndarray, method: Method) -> "Caches":
        return self


def _merged(needs: list, merge) -> list:
    """Needs folded into as few passes as merge allows, in order."""
    plan = []
    for need in needs:
        if need is None:
            continue
        for i, p in enumerate(plan):
            m = merge(p, need)
            if m is not None:
                plan[i] = m
                break
        else:
            plan.append(need)
    return plan


def _any_needs(targets: dict, positions: np.ndarray) -> Optional[TargetNeeds]:
    key = positions.tobytes()
    return next((needs for (k, needs) in targets if k == key), None)
