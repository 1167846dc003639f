"""Speculative decoding of the answer: a drafter proposes the next few
tokens, the target scores them in one batch on its (compressed) KV and keeps
the longest run it agrees with, plus one token of its own.

Two drafters, both deterministic (their proposal distribution q is one-hot):
- `PromptLookup`: the continuation of the longest recent n-gram match in the
  whole prompt and the answer so far (not only the kept tokens): free to
  compute, and answers about a document copy its spans;
- `DraftModel`: the draft model, greedily, from its context of the whole
  prompt (the one it read to choose what the target keeps).
With `speculative="auto"`, `AutoDrafter` takes, step by step, a plain
step, the lookup's or the draft's proposal, whichever its `Planner`
expects the most tokens per second of, from what this answer has measured
(the target's batch costs, each drafter's cost and acceptance): where
speculation would not pay, it decodes as without.

Greedy decoding accepts a proposal where it is the target's argmax, so the
answer is the target's greedy answer (up to a batch's rounding, DESIGN.md
§11). Sampling accepts a proposal x with probability p(x), else emits a
draw from p without x: speculative sampling's rule (Leviathan et al. 2023;
Chen et al. 2023) for a one-hot q, which leaves the output distributed as
the target's p exactly (`Verifier`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .engine import Sampling

MODES = ("off", "lookup", "draft", "auto")
DEFAULT = "off"  # of generate, Document.ask, the CLI and the server
K_MIN, K_MAX = 1, 8  # tokens proposed per step: adapted to what was accepted


@dataclass
class SpecCounts:
    """What speculation did over one answer."""

    steps: int = 0          # target batches that verified proposals
    drafted: int = 0        # tokens proposed
    accepted: int = 0       # of them, those the target kept
    draft_decodes: int = 0  # the draft model's decode calls (what its proposals cost)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")


def step_cost(draft, target) -> float:
    """A draft decode step's cost in target steps, as first guessed: a step
    reads every weight once, so their files' sizes (DESIGN.md §11)."""
    return os.path.getsize(draft.path) / os.path.getsize(target.path)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"speculative must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


class AdaptiveK:
    """k, the tokens proposed per step: one more after a step whose
    proposals were all accepted, else one more than were."""

    k = 2

    def feedback(self, proposed: int, accepted: int, batch_tokens: int, batch_s: float) -> None:
        if proposed:
            self.k = min(K_MAX, self.k + 1) if accepted == proposed else max(K_MIN, accepted + 1)


class PromptLookup(AdaptiveK):
    """Proposes what followed the most recent earlier occurrence of the
    text's last n tokens (the longest n from `max_ngram` down to
    `min_ngram` that occurs), in the prompt and the answer so far.

    Args:
        prompt: the whole prompt's tokens.
        max_ngram, min_ngram: the n-gram sizes tried, longest first (4, 2).
    """

    def __init__(self, prompt: np.ndarray, max_ngram: int = 4, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, not {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._text = np.empty(len(prompt) + 1024, np.int32)
        self._text[:len(prompt)] = prompt
        self._n = len(prompt)

    def propose(self, new: Sequence[int], room: int) -> list:
        """Up to min(k, room) tokens to follow the text, after appending `new` to it."""
        self.append(new)
        return self.match(min(self.k, room))

    def match(self, k: int) -> list:
        """Up to k tokens that followed the latest longest match of the text's end."""
        text, n = self._text, self._n
        for size in range(min(self.max_ngram, n - 1), self.min_ngram - 1, -1):
            tail = text[n - size:n]
            # starts of earlier occurrences of the tail, each with at least one token after it
            hits = np.ones(n - size, dtype=bool)
            for i in range(size):
                hits &= text[i:n - size + i] == tail[i]
            starts = np.flatnonzero(hits)
            if len(starts):
                after = starts[-1] + size
                return text[after:min(after + k, n)].tolist()
        return []

    def append(self, new: Sequence[int]) -> None:
        if self._n + len(new) > len(self._text):
            grown = np.empty(2 * (self._n + len(new)), np.int32)
            grown[:self._n] = self._text[:self._n]
            self._text = grown
        self._text[self._n:self._n + len(new)] = new
        self._n += len(new)


class DraftModel(AdaptiveK):
    """Proposes the draft model's greedy continuation. Its context holds
    the whole prompt in `seq` (cells beyond `n_prompt`, the lookahead it
    drafted, are removed first); each call decodes the text's new tokens
    (keeping those of its earlier proposals the target accepted) and
    drafts k tokens, one decode each."""

    def __init__(self, context, n_prompt: int, seq: int = 0, counts: Optional[SpecCounts] = None):
        self.context, self.seq = context, seq
        self.counts = counts if counts is not None else SpecCounts()
        context.seq_rm(seq, n_prompt, -1)
        context.set_sampler(0.0, 1.0, 0)
        self._pos = n_prompt   # cells of the text held
        self._decoded: list = []  # proposals decoded after them, in order
        self.catch_up_s = self.propose_s = 0.0

    def propose(self, new: Sequence[int], room: int) -> list:
        return self.draft(new, min(self.k, room))

    def draft(self, new: Sequence[int], k: int) -> list:
        """Take in the text's `new` tokens (one decode, which also gives
        the first proposal), then draft k tokens; the seconds of each part
        are kept in `catch_up_s` and `propose_s`."""
        t0 = time.perf_counter()
        new = list(new)
        same = 0
        while same < min(len(new), len(self._decoded)) and new[same] == self._decoded[same]:
            same += 1
        self.context.seq_rm(self.seq, self._pos + same, -1)  # rejected proposals
        self._pos += same
        rest = new[same:]
        self._decoded = []
        if not rest:  # cannot happen from `generate` (the target's own token is always new); kept safe
            return []
        self.context.decode(np.asarray(rest, np.int32), self._pos, self.seq, "last")
        self.counts.draft_decodes += 1
        self._pos += len(rest)
        t1 = time.perf_counter()
        self.catch_up_s = t1 - t0
        proposals = []
        for i in range(k):
            token = self.context.sample()
            proposals.append(token)
            if i + 1 < k:
                self.context.decode(np.asarray([token], np.int32), self._pos + i, self.seq, "last")
                self.counts.draft_decodes += 1
                self._decoded.append(token)
        self.propose_s = time.perf_counter() - t1
        return proposals


class Source:
    """What one drafter has shown in this answer, in target steps: how often
    the target accepts its next proposal (successes and failures, older
    steps weighing less; a prior of one each), what a proposed token costs
    beyond the first, and what taking in a token of text it has not seen
    costs (the draft's decode of the text since it last drafted, which also
    gives its first proposal)."""

    def __init__(self, cost: float):
        self.cost = self.catch_up = cost
        self.hits = self.misses = 1.0
        self.unseen = 0   # tokens of text to take in before proposing
        self.skipped = 0  # steps it could have proposed and did not

    @property
    def acceptance(self) -> float:
        return self.hits / (self.hits + self.misses)

    def accepted(self, proposed: int, accepted: int) -> None:
        self.hits = 0.9 * self.hits + accepted
        self.misses = 0.9 * self.misses + (accepted < proposed)


class Planner:
    """Plain step or k proposals from one drafter: whichever is expected to
    give the most answer tokens per second. k proposals accepted one after
    the other with probability α give (1 − α^(k+1)) / (1 − α) tokens; they
    cost a target batch of k + 1 tokens (one step plus `extra` steps per
    added token, measured) and the drafter's time (its catch-up and k − 1
    more tokens, measured)."""

    PROBE_EVERY = 16  # steps a drafter sits out before it is tried once more, where it might pay
    WEIGHT = 0.3      # of a new measurement against the running estimate

    def __init__(self, draft_cost: float):
        self.step_s: Optional[float] = None  # a one-token batch of the target, seconds
        self.extra = 0.25                    # each added token of a batch, in steps (until measured)
        self.sources = {"lookup": Source(0.0), "draft": Source(draft_cost)}

    def rate(self, source: str, k: int, acceptance: Optional[float] = None) -> float:
        """Expected tokens per target step of proposing k from `source`."""
        if k == 0:
            return 1.0
        src = self.sources[source]
        a = src.acceptance if acceptance is None else acceptance
        drafting = src.catch_up * max(1, src.unseen) + src.cost * (k - 1)
        return (1 - a ** (k + 1)) / (1 - a) / (1 + self.extra * k + drafting)

    def choose(self, available: dict) -> tuple:
        """(source, k) for the next step, of {source: the most it can propose}."""
        if self.step_s is None:  # a plain step first: what a step costs
            return None, 0
        best, best_rate = (None, 0), 1.0
        for source, most in available.items():
            if most >= 1:
                k, rate = max(((k, self.rate(source, k)) for k in range(1, most + 1)), key=lambda kr: kr[1])
                if rate > best_rate:
                    best, best_rate = (source, k), rate
        for source, most in available.items():
            src = self.sources[source]
            src.skipped = 0 if source == best[0] else src.skipped + (most >= 1)
        if best[0] is None:  # a drafter that sat out long enough tries once more, where it might pay
            for source, most in available.items():
                src = self.sources[source]
                if most >= 1 and src.skipped >= self.PROBE_EVERY and self.rate(source, 1, acceptance=0.95) > 1:
                    src.skipped = 0
                    return source, 1
        return best

    def batch(self, tokens: int, seconds: float) -> None:
        """A target batch of `tokens` took `seconds`."""
        w = self.WEIGHT
        if tokens == 1:
            self.step_s = seconds if self.step_s is None else (1 - w) * self.step_s + w * seconds
        elif self.step_s:
            extra = max(0.0, (seconds / self.step_s - 1) / (tokens - 1))
            self.extra = (1 - w) * self.extra + w * extra

    def drafted(self, source: str, k: int, unseen: int, catch_up_s: float, propose_s: float) -> None:
        """`source` took catch_up_s to take in `unseen` tokens, then
        propose_s for its k - 1 further proposals."""
        if not self.step_s:
            return
        src, w = self.sources[source], self.WEIGHT
        src.catch_up = (1 - w) * src.catch_up + w * catch_up_s / max(1, unseen) / self.step_s
        if k > 1:
            src.cost = (1 - w) * src.cost + w * propose_s / (k - 1) / self.step_s


class AutoDrafter:
    """speculative="auto": each step a plain step, the lookup's proposal or
    the draft's, as the `Planner` expects the most tokens per second of;
    the draft (where there is one) catches up with the text when next
    asked.

    Args:
        lookup: the prompt lookup.
        draft: the draft model, or None.
        draft_cost: the prior cost of a draft token, in target steps (e.g.
            the draft's bytes over the target's: a step reads every weight).
    """

    def __init__(self, lookup: PromptLookup, draft: Optional[DraftModel] = None, draft_cost: float = 1.0):
        self.lookup, self.draft = lookup, draft
        self.planner = Planner(draft_cost)
        self._unseen: list = []  # text the draft has not decoded yet
        self._source: Optional[str] = None

    def propose(self, new: Sequence[int], room: int) -> list:
        self.lookup.append(new)
        self._unseen += list(new)
        match = self.lookup.match(min(K_MAX, room))
        available = {"lookup": len(match)}
        if self.draft is not None:
            available["draft"] = min(K_MAX, room)
            self.planner.sources["draft"].unseen = len(self._unseen)
        self._source, k = self.planner.choose(available)
        if self._source == "lookup":
            return match[:k]
        if self._source == "draft":
            unseen, self._unseen = self._unseen, []
            proposals = self.draft.draft(unseen, k)
            self.planner.drafted("draft", k, len(unseen), self.draft.catch_up_s, self.draft.propose_s)
            return proposals
        return []

    def feedback(self, proposed: int, accepted: int, batch_tokens: int, batch_s: float) -> None:
        self.planner.batch(batch_tokens, batch_s)
        if self._source is not None and proposed:
            self.planner.sources[self._source].accepted(proposed, accepted)


def make_drafter(mode: str, prompt: np.ndarray, draft_context=None, counts: Optional[SpecCounts] = None,
                 draft_cost: float = 1.0):
    """The drafter of `mode` (None for "off"). draft_context: the draft's
    context holding the whole prompt in sequence 0, where the draft drafts
    (None: it does not); draft_cost: a draft step's first guessed cost in
    target steps (`step_cost`)."""
    if mode == "off":
        return None
    lookup = PromptLookup(prompt) if mode != "draft" else None
    draft = DraftModel(draft_context, len(prompt), counts=counts) if draft_context is not None else None
    if mode == "auto":
        return AutoDrafter(lookup, draft, draft_cost)
    return lookup or draft


def target_probs(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The distribution the target samples from (as its llama.cpp sampler
    chain does: top-p on the plain softmax, then the temperature)."""
    logits = logits.astype(np.float64)
    keep = np.ones(len(logits), dtype=bool)
    if sampling.top_p < 1.0:
        order = np.argsort(-logits, kind="stable")
        p = np.exp(logits[order] - logits[order[0]])
        p /= p.sum()
        # the smallest head of the order whose mass reaches top_p (at least one token)
        n_keep = max(1, int(np.searchsorted(np.cumsum(p), sampling.top_p) + 1))
        keep[:] = False
        keep[order[:n_keep]] = True
    z = np.where(keep, logits / sampling.temperature, -np.inf)
    probs = np.exp(z - z.max())
    return probs / probs.sum()


class Verifier:
    """The target's token at each answer position from its logits there:
    the argmax when greedy; with sampling, a draw from its distribution p
    with the position's own seeded uniform number (by inverting p's
    cumulative sum), so the answer does not depend on how positions fell
    into batches. A proposal is accepted where it is that draw: with
    probability p(x), and where not, the token emitted is distributed as p
    without x — speculative sampling's rule for a one-hot proposal."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.greedy = sampling.temperature == 0.0

    def accepts(self, logits: np.ndarray, proposal: int, position: int) -> tuple:
        """(accepted, the token to emit instead where not)."""
        token = self.draw(logits, position)
        return token == proposal, token

    def draw(self, logits: np.ndarray, position: int) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        cdf = np.cumsum(target_probs(logits, self.sampling))
        u = np.random.default_rng((self.sampling.seed, position)).random() * cdf[-1]
        return min(int(np.searchsorted(cdf, u, side="right")), len(cdf) - 1)


def generate(context, seq: int, drafter, max_tokens: int, sampling: Sampling, is_eog: Callable[[int], bool],
             counts: Optional[SpecCounts] = None) -> Iterator[int]:
    """The target's answer tokens, as `engine.Context.generate` yields them
    (after a prefill that asked for the last logits; an end-of-generation
    token ends it unyielded), drafted by `drafter` and verified in batches."""
    if max_tokens < 0:
        raise ValueError("max_tokens must be >= 0")
    if max_tokens == 0:
        return
    counts = counts if counts is not None else SpecCounts()
    verify = Verifier(sampling)
    token = verify.draw(context.logits(), 0)
    new, produced = [token], 0
    while True:
        if is_eog(token):
            return
        yield token
        produced += 1
        if produced == max_tokens:
            return
        # what follows `token` can be at most max_tokens - produced tokens: the proposals and the target's own
        proposals = drafter.propose(new, max_tokens - produced - 1) if max_tokens - produced > 1 else []
        pos = context.next_pos(seq)
        t0 = time.perf_counter()
        rows = context.decode(np.asarray([token] + proposals, np.int32), pos, seq, "all")
        batch_s = time.perf_counter() - t0
        accepted = []
        for i, proposal in enumerate(proposals):
            ok, instead = verify.accepts(rows[i], proposal, produced + i)
            if not ok:
                token = instead
                break
            accepted.append(proposal)
        else:
            token = verify.draw(rows[len(proposals)], produced + len(proposals))
        if len(accepted) < len(proposals):
            context.seq_rm(seq, pos + 1 + len(accepted), -1)  # the rejected proposals' cells
        drafter.feedback(len(proposals), len(accepted), 1 + len(proposals), batch_s)
        if proposals:
            counts.steps += 1
            counts.drafted += len(proposals)
            counts.accepted += len(accepted)
        for proposal in accepted:
            if is_eog(proposal):
                return
            yield proposal
            produced += 1
        new = accepted + [token]
