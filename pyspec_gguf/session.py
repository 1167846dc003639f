"""SpecSession: load a draft and a target once, answer many long prompts.

    with SpecSession() as s:                      # the registry's default pair
        r = s.generate(messages, method="specpc", budget=1024, max_tokens=64)
        print(r.text, r.stats)
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from . import registry
from ._log import logger as log
from .engine import Model, Sampling, default_threads, iter_text
from .methods import KVMethod, Method, PromptMethod, SpecKVPC, make_method
from .scoring import aggregate, prefill_with_capture

Prompt = Union[str, Sequence[dict]]
# "eviction": dropping the unselected KV entries and compacting (or, per
# head, rewriting) the target's cache
STAGES = ("draft_prefill", "lookahead", "scoring", "target_prefill", "eviction", "decode")


@dataclass
class Stats:
    method: str
    prompt_tokens: int
    kept_tokens: int          # prompt tokens the target saw, or KV entries it kept
    budget: int
    generated_tokens: int = 0
    times: dict = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    ttft_s: float = 0.0       # from the call to the first token
    decode_tok_s: float = float("nan")
    target_kv_bytes: int = 0  # KV bytes the target holds when decoding starts
    peak_rss_bytes: int = 0   # of the process, so far

    def line(self) -> str:
        t = self.times
        return (f"[{self.method}] prompt {self.prompt_tokens} tok, kept {self.kept_tokens} | ttft {self.ttft_s:.2f} s "
                f"(draft {t['draft_prefill'] + t['lookahead']:.2f} s, target prefill {t['target_prefill']:.2f} s) | "
                f"decode {self.generated_tokens} tok, {self.decode_tok_s:.1f} tok/s | "
                f"target KV {self.target_kv_bytes / 2**20:.1f} MiB | peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB")


@dataclass
class Result:
    text: str
    tokens: list
    stats: Stats
    kept: np.ndarray               # prompt positions the answer was built from (per-head: their union)
    scores: Optional[np.ndarray]   # the method's score of every prompt token, if it has one
                                   # (per-head eviction: [layer, kv_head, token])
    prompt_tokens: np.ndarray
    kept_per_head: Optional[np.ndarray] = None  # [layer, kv_head, C] prompt positions, per-head eviction only


def peak_rss() -> int:
    """Peak resident memory of this process, in bytes. On Linux from VmHWM:
    ru_maxrss survives exec, so a child process would report its parent's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024


class _Job:
    """One generate call: the prompt, the shared draft state and the clock."""

    def __init__(self, session: "SpecSession", tokens: np.ndarray, progress):
        self.session = session
        self.draft = session.draft
        self.tokens = tokens
        self.progress = progress
        self.draft_tokens: Optional[np.ndarray] = None
        self.times = {s: 0.0 for s in STAGES}
        self._contexts = []

    @contextmanager
    def timer(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[stage] += time.perf_counter() - t0

    def draft_context(self, n_ctx: int):
        if self.draft is None:
            raise ValueError("this method needs a draft model")
        ctx = self.draft.context(n_ctx=n_ctx, **self.session.context_options)
        self._contexts.append(ctx)
        return ctx

    def close(self):
        for ctx in self._contexts:
            ctx.close()
        self._contexts.clear()


class SpecSession:
    """A draft/target pair loaded once.

    Args:
        draft, target: model specs (registry names, .gguf paths, Hugging Face
            specs); the registry's default pair when omitted. draft=None with
            target given loads no draft (methods that need one will refuse).
        n_threads, n_batch, n_ubatch, n_gpu_layers: passed to llama.cpp.
    """

    def __init__(self, draft: Optional[str] = "", target: Optional[str] = None, n_threads: int = 0,
                 n_batch: int = 512, n_ubatch: int = 512, n_gpu_layers: int = 0, progress: bool = True):
        self.context_options = {"n_threads": n_threads or default_threads(), "n_batch": n_batch,
                                "n_ubatch": n_ubatch}
        self.target = Model(target or registry.default_model("target"), n_gpu_layers=n_gpu_layers,
                            progress=progress)
        self.draft = None
        try:
            if draft is not None:
                self.draft = Model(draft or registry.default_model("draft"), n_gpu_layers=n_gpu_layers,
                                   progress=progress)
                if self.draft.vocab_fingerprint() != self.target.vocab_fingerprint():
                    raise ValueError(f"the draft ({self.draft.path}) and target ({self.target.path}) tokenizers "
                                     "differ: the draft's token positions would not match the target's")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for model in (self.draft, self.target):
            if model is not None:
                model.close()

    def __enter__(self) -> "SpecSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ public

    def tokenize(self, prompt: Prompt) -> np.ndarray:
        return self.target.tokenize_prompt(prompt)

    def generate(self, prompt: Prompt, method: Union[str, Method] = "specpc", budget: Union[int, float] = 1024,
                 max_tokens: int = 128, stream: bool = False, sampling: Sampling = Sampling(),
                 protect_last: int = 0, progress: Optional[Callable[[int, int], None]] = None,
                 **method_options):
        """Answer `prompt` (text or chat messages) with `method` at `budget`
        tokens (an int) or fraction of the prompt (a float in (0, 1)).

        Returns a Result; with stream=True, a Stream that yields text pieces
        and holds the Result once exhausted. `protect_last` tokens at the end
        (e.g. the question) are always kept, as are the chat template's
        control tokens.
        """
        if isinstance(method, str):
            method = make_method(method, **method_options)
        elif method_options:
            raise ValueError("method options go with a method name, not a method object")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, not {max_tokens!r}")
        if method.uses_draft and self.draft is None:
            raise ValueError(f"{method.name} needs a draft model; this session has none")
        tokens = self.tokenize(prompt)
        n_budget = resolve_budget(budget, len(tokens))
        if isinstance(protect_last, bool) or not isinstance(protect_last, int) or protect_last < 0:
            raise ValueError(f"protect_last must be an integer >= 0, not {protect_last!r}")
        protect_last = max(protect_last, self.template_tail(prompt, tokens))
        run = _Run(self, method, tokens, n_budget, max_tokens, sampling, protect_last, progress)
        stream_ = Stream(run)
        if stream:
            return stream_
        for _ in stream_:
            pass
        return stream_.result

    # ------------------------------------------------------------ helpers

    def template_tail(self, prompt: Prompt, tokens: np.ndarray) -> int:
        """How many tokens the chat template adds after the last message's
        content (end of turn, the assistant's header): found as the common
        tail of the prompt and the same prompt with that content emptied."""
        if isinstance(prompt, str):
            return 0
        emptied = list(prompt[:-1]) + [{**prompt[-1], "content": ""}]
        other = self.target.tokenize(self.target.apply_chat_template(emptied), add_special=False)
        n = 0
        while n < min(len(tokens), len(other)) and tokens[-1 - n] == other[-1 - n]:
            n += 1
        return n

    def protected_positions(self, tokens: np.ndarray, protect_last: int) -> np.ndarray:
        """Control tokens of the chat template, and the last `protect_last`."""
        control = np.flatnonzero([self.target.is_control(int(t)) for t in tokens])
        tail = np.arange(max(0, len(tokens) - protect_last), len(tokens))
        return np.union1d(control, tail).astype(np.int64)


def resolve_budget(budget, n_prompt: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise ValueError(f"budget must be a token count (int) or a fraction in (0, 1) (float), not {budget!r}")
    if isinstance(budget, (float, np.floating)):
        if not 0.0 < budget < 1.0:
            raise ValueError(f"a fractional budget must be in (0, 1), not {budget}")
        return max(1, int(round(budget * n_prompt)))
    if budget < 1:
        raise ValueError(f"budget must be at least 1 token, not {budget}")
    return int(budget)


class _Run:
    """The pipeline of one generate call, up to a context ready to sample."""

    def __init__(self, session, method, tokens, budget, max_tokens, sampling, protect_last, progress):
        self.session, self.method, self.tokens = session, method, tokens
        self.budget, self.max_tokens, self.sampling = budget, max_tokens, sampling
        self.protected = session.protected_positions(tokens, protect_last)
        if len(self.protected) >= budget and len(tokens) > budget:
            raise ValueError(f"budget {budget} leaves no room beyond the {len(self.protected)} protected tokens "
                             "(chat template control tokens and protect_last)")
        self.job = _Job(session, tokens, progress)
        self.kept = np.arange(len(tokens), dtype=np.int32)
        self.kept_per_head = None
        self.kv_cells = None  # KV cells the target holds, where that is not len(kept)
        self.scores = None
        self.model = session.target

    def prepare(self):
        """Run every stage before decoding; return the context to sample from."""
        m = self.method
        if m.name == "draft":
            self.model = self.session.draft
            ctx = self.job.draft_context(len(self.tokens) + self.max_tokens + 8)
            return self._prefill(ctx, self.tokens, "draft_prefill")
        if m.stage == "none":
            return self._target_prefill(self.tokens)
        if isinstance(m, PromptMethod):
            self.kept = self._prompt_stage(m, self.tokens, self.protected)
            return self._target_prefill(self.tokens[self.kept])
        if isinstance(m, KVMethod):
            return self._kv_stage(m, self.tokens, self.protected, positions=None)
        if isinstance(m, SpecKVPC):
            return self._cascade(m)
        raise ValueError(f"method {m.name} has no pipeline")

    # -- stages

    def _target_context(self, n_prompt: int):
        ctx = self.session.target.context(n_ctx=n_prompt + self.max_tokens + 8, **self.session.context_options)
        self.job._contexts.append(ctx)
        return ctx

    def _prefill(self, ctx, tokens, stage: str):
        with self.job.timer(stage):
            ctx.prefill(tokens, progress=self.job.progress)
        return ctx

    def _target_prefill(self, tokens):
        return self._prefill(self._target_context(len(tokens)), tokens, "target_prefill")

    def _prompt_stage(self, method: PromptMethod, tokens, protected) -> np.ndarray:
        if len(tokens) <= self.budget:
            return np.arange(len(tokens), dtype=np.int32)
        scores = method.score_prompt(self.job)
        with self.job.timer("scoring"):
            kept = method.select(scores, self.budget, protected)
        self.scores = scores
        return kept

    def _kv_stage(self, method: KVMethod, tokens, protected, positions):
        """Target prefill with capture, keep the selected KV, compact, and
        decode the last prompt token again. `positions` maps the tokens to
        original prompt positions (None: identity)."""
        n = len(tokens)
        positions = np.arange(n, dtype=np.int32) if positions is None else positions
        if n <= self.budget:
            self.kept = positions
            return self._target_prefill(tokens)
        lookahead = method.lookahead_tokens(self.job) if method.captures else np.empty(0, np.int32)
        ctx = self._target_context(n + len(lookahead))
        with self.job.timer("target_prefill"):
            if method.captures:
                layers = np.arange(self.session.target.n_layer)
                w = min(method.window + 1, n)
                queries = np.arange(n - w, n + len(lookahead))
                raw = prefill_with_capture(ctx, np.concatenate([tokens, lookahead]).astype(np.int32), layers,
                                           queries, None, method.reduction, progress=self.job.progress)
                scores = aggregate(raw[..., : n - 1], method.aggregation)
            else:
                ctx.prefill(tokens, want="none", progress=self.job.progress)
                scores = np.zeros(n - 1, np.float32)
        protected = protected[protected < n - 1]
        per_head = method.granularity == "head" and method.captures and self._keep_per_head(
            method, ctx, raw[..., : n - 1], protected, positions)
        if not per_head:
            with self.job.timer("scoring"):
                keep = method.select(scores, self.budget, protected)
            with self.job.timer("eviction"):
                ctx.seq_keep_positions(0, keep)
                ctx.compact(0, n_ctx=len(keep) + self.max_tokens + 8)
            self.kept = positions[np.append(keep, n - 1)]
            self.scores = scores
        with self.job.timer("target_prefill"):
            ctx.prefill(tokens[-1:])
        return ctx

    def _keep_per_head(self, method, ctx, raw, protected, positions) -> bool:
        """Every layer and KV head keeps its own entries; the C cells take the
        positions just before the last prompt token, which is then decoded at
        its own. False (and a warning) where the model's KV cache cannot be
        rewritten: the caller keeps one set instead."""
        n = raw.shape[-1] + 1
        with self.job.timer("scoring"):
            keep = method.select_per_head(raw, self.budget, protected)
        c = keep.shape[-1]
        try:
            with self.job.timer("eviction"):
                ctx.keep_per_head(0, keep, np.arange(n - 1 - c, n - 1, dtype=np.int32),
                                  n_ctx=c + self.max_tokens + 8)
        except ValueError as e:
            log.warning("%s: per-head eviction unavailable (%s); keeping one set for all heads", method.name, e)
            return False
        self.kept_per_head = positions[keep]
        self.scores = raw
        self.kept = np.append(np.unique(self.kept_per_head), positions[n - 1]).astype(np.int32)
        self.kv_cells = c + 1
        return True

    def _cascade(self, m: SpecKVPC):
        tokens, protected = self.tokens, self.protected
        if len(tokens) <= self.budget:
            return self._target_prefill(tokens)
        # compress the prompt no further than the final budget needs
        pc_budget = max(m.pc_budget, self.budget)
        if len(tokens) > pc_budget:
            budget, self.budget = self.budget, pc_budget
            kept = self._prompt_stage(m.prompt_stage, tokens, protected)
            self.budget = budget
            protected = np.flatnonzero(np.isin(kept, protected))
            tokens = tokens[kept]
        else:
            kept = np.arange(len(tokens), dtype=np.int32)
            m.prompt_stage.score_prompt(self.job)  # drafts the lookahead tokens
        return self._kv_stage(m.kv_stage, tokens, protected, positions=kept)


class Stream:
    """Text pieces of the answer as they are generated; `.result` after."""

    def __init__(self, run: _Run):
        self._run = run
        self.result: Optional[Result] = None

    def __iter__(self) -> Iterator[str]:
        run, job = self._run, self._run.job
        t0 = time.perf_counter()
        try:
            ctx = run.prepare()
            tokens = []
            first = None

            def counted():
                nonlocal first
                for tok in ctx.generate(run.max_tokens, run.sampling):
                    if first is None:
                        first = time.perf_counter()
                    tokens.append(tok)
                    yield tok

            t_dec = time.perf_counter()
            yield from iter_text(run.model, counted())
            t_end = time.perf_counter()
            job.times["decode"] = t_end - t_dec
            stats = Stats(method=run.method.name, prompt_tokens=len(run.tokens),
                          kept_tokens=run.kv_cells or len(run.kept),
                          budget=run.budget, generated_tokens=len(tokens), times=job.times,
                          ttft_s=(first or t_end) - t0,
                          decode_tok_s=(len(tokens) - 1) / (t_end - first) if first and len(tokens) > 1
                          and t_end > first else float("nan"),
                          target_kv_bytes=(run.kv_cells or len(run.kept)) * run.model.kv_bytes_per_token,
                          peak_rss_bytes=peak_rss())
            self.result = Result(text=run.model.detokenize(tokens), tokens=tokens, stats=stats,
                                 kept=np.asarray(run.kept, np.int32), scores=run.scores, prompt_tokens=run.tokens,
                                 kept_per_head=run.kept_per_head)
        finally:
            job.close()
