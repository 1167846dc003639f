"""Speculative decoding of the answer: a drafter proposes the next few
tokens, the target scores them in one batch on its (compressed) KV and keeps
the longest run it agrees with, plus one token of its own.

Two drafters, both deterministic (their proposal distribution q is one-hot):
- `PromptLookup`: the continuation of the longest recent n-gram match in the
  whole prompt and the answer so far (not only the kept tokens): free to
  compute, and answers about a document copy its spans;
- `DraftModel`: the draft model, greedily, from its context of the whole
  prompt (the one it read to choose what the target keeps).
`LookupThenDraft` asks the lookup first and the draft where it finds no
match.

Greedy decoding accepts a proposal where it is the target's argmax, so the
answer is the target's greedy answer (up to a batch's rounding, DESIGN.md
§11). Sampling accepts a proposal x with probability p(x), else draws from p
without x, renormalized: speculative sampling's rule (Leviathan et al. 2023;
Chen et al. 2023) for a one-hot q, which leaves the output distributed as
the target's p exactly.
"""

from __future__ import annotations

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


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"speculative must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


class PromptLookup:
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

    def propose(self, new: Sequence[int], k: int) -> list:
        """Up to k tokens to follow the text, after appending `new` to it."""
        self._append(new)
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

    def _append(self, new: Sequence[int]) -> None:
        if self._n + len(new) > len(self._text):
            grown = np.empty(2 * (self._n + len(new)), np.int32)
            grown[:self._n] = self._text[:self._n]
            self._text = grown
        self._text[self._n:self._n + len(new)] = new
        self._n += len(new)


class DraftModel:
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

    def propose(self, new: Sequence[int], k: int) -> list:
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
        proposals = []
        for i in range(k):
            token = self.context.sample()
            proposals.append(token)
            if i + 1 < k:
                self.context.decode(np.asarray([token], np.int32), self._pos + i, self.seq, "last")
                self.counts.draft_decodes += 1
                self._decoded.append(token)
        return proposals


class LookupThenDraft:
    """The lookup's proposal where it finds a match, else the draft's; the
    draft catches up with the text when it is next asked."""

    def __init__(self, lookup: PromptLookup, draft: DraftModel):
        self.lookup, self.draft = lookup, draft
        self._unseen: list = []  # text the draft has not decoded yet

    def propose(self, new: Sequence[int], k: int) -> list:
        self._unseen += list(new)
        proposals = self.lookup.propose(new, k)
        if proposals:
            return proposals
        unseen, self._unseen = self._unseen, []
        return self.draft.propose(unseen, k)


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
    """The target's choice at each row of its logits: argmax when greedy;
    with sampling, speculative sampling's accept/reject of a one-hot
    proposal, seeded."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.greedy = sampling.temperature == 0.0
        self.rng = None if self.greedy else np.random.default_rng(sampling.seed)

    def accepts(self, logits: np.ndarray, proposal: int) -> tuple:
        """(accepted, the token to emit instead where not)."""
        if self.greedy:
            best = int(np.argmax(logits))
            return best == proposal, best
        p = target_probs(logits, self.sampling)
        if self.rng.random() < p[proposal]:
            return True, proposal
        p[proposal] = 0.0  # the residual max(0, p - q) of a one-hot q
        total = p.sum()
        if total <= 0.0:  # p was all on the proposal: accepted with certainty above
            return True, proposal
        return False, int(self.rng.choice(len(p), p=p / total))

    def draw(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        p = target_probs(logits, self.sampling)
        return int(self.rng.choice(len(p), p=p))


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
    token = verify.draw(context.logits())
    new, produced, k = [token], 0, 2
    while True:
        if is_eog(token):
            return
        yield token
        produced += 1
        if produced == max_tokens:
            return
        # what follows `token` can be at most max_tokens - produced tokens: the proposals and the target's own
        proposals = drafter.propose(new, min(k, max_tokens - produced - 1)) if max_tokens - produced > 1 else []
        pos = context.next_pos(seq)
        rows = context.decode(np.asarray([token] + proposals, np.int32), pos, seq, "all")
        accepted = []
        for i, proposal in enumerate(proposals):
            ok, instead = verify.accepts(rows[i], proposal)
            if not ok:
                token = instead
                break
            accepted.append(proposal)
        else:
            token = verify.draw(rows[len(proposals)])
        if len(accepted) < len(proposals):
            context.seq_rm(seq, pos + 1 + len(accepted), -1)  # the rejected proposals' cells
        if proposals:
            counts.steps += 1
            counts.drafted += len(proposals)
            counts.accepted += len(accepted)
            k = min(K_MAX, k + 1) if len(accepted) == len(proposals) else max(K_MIN, len(accepted) + 1)
        for proposal in accepted:
            if is_eog(proposal):
                return
            yield proposal
            produced += 1
        new = accepted + [token]
