"""SpecSession: load a draft and a target once, answer many long prompts.

    with SpecSession() as s:                      # the registry's default pair
        r = s.generate(messages, method="specpc", budget=1024, max_tokens=64)
        print(r.text, r.stats)
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from . import registry, speculate
from ._log import logger as log
from .derive import QUANTS, derived_draft
from .engine import Model, PromptTooLong, Sampling, default_threads, iter_text, transfers, transfers_since
from .methods import Method, make_method
from .passes import STAGES
from .pipeline import Analysis, Caches
from .speed import Choice, ModelSpeed, SpeedBook, calibrate, speed_key

if TYPE_CHECKING:
    from .compress import Compressed
    from .document import Document

# text, chat messages, or token ids already made (a numpy array of ints)
Prompt = Union[str, Sequence[dict], np.ndarray]


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
    draft_cached: int = 0     # prompt tokens the draft found in its prefix cache (not prefilled again)
    target_cached: int = 0    # the same for the target
    auto: Optional[dict] = None  # method="auto": what it chose and why (`speed.Choice`)
    speculative: str = "off"  # who drafted the answer: off, lookup, draft or auto
    drafted: int = 0          # answer tokens proposed
    accepted: int = 0         # of them, those the target kept
    verify_steps: int = 0     # the target's batches that verified them
    draft_decodes: int = 0    # the draft model's decode calls that proposed them
    draft_kv_bytes: int = 0   # KV bytes the draft holds while it drafts the answer
    # copies between llama.cpp's buffers and the host, by kind (state_read,
    # state_write, capture_read): [calls, bytes], over the bus on a GPU build
    transfers: dict = field(default_factory=dict)

    @property
    def host_bytes(self) -> int:
        """Bytes the answer moved between llama.cpp's buffers and the host."""
        return sum(b for _, b in self.transfers.values())

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    def line(self) -> str:
        t = self.times
        cached = ""
        if self.draft_cached or self.target_cached:
            cached = f", cached: draft {self.draft_cached}, target {self.target_cached}"
        chosen = ""
        if self.auto:
            chosen = f", {Choice(**self.auto).describe()}"
        return (f"[{self.method}{chosen}] prompt {self.prompt_tokens} tok{cached}, kept {self.kept_tokens} | "
                f"ttft {self.ttft_s:.2f} s "
                f"(draft {t['draft_prefill'] + t['lookahead']:.2f} s, target prefill {t['target_prefill']:.2f} s) | "
                f"decode {self.generated_tokens} tok, {self.decode_tok_s:.1f} tok/s{self._speculation()} | "
                f"target KV {self.target_kv_bytes / 2**20:.1f} MiB | peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB")

    def _speculation(self) -> str:
        if self.speculative == "off":
            return ""
        held = f", draft KV {self.draft_kv_bytes / 2**20:.1f} MiB" if self.draft_kv_bytes else ""
        return f" ({self.speculative}: {self.accepted}/{self.drafted} drafted tokens accepted{held})"


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
    finish_reason: str = "stop"    # "stop" (end of turn or a stop string) or "length" (max_tokens reached)

    def to_dict(self) -> dict:
        """Plain JSON types: text, tokens, stats, kept positions and prompt
        tokens as lists (the scores, being large, are left out)."""
        stats = {k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(self.stats).items()}
        return {"text": self.text, "tokens": [int(t) for t in self.tokens], "stats": stats,
                "kept": self.kept.tolist(), "prompt_tokens": self.prompt_tokens.tolist(),
                "kept_per_head": None if self.kept_per_head is None else self.kept_per_head.tolist(),
                "finish_reason": self.finish_reason}


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


class SpecSession:
    """A draft/target pair loaded once.

    Args:
        draft, target: model specs (registry names, .gguf paths, Hugging Face
            specs); the registry's default pair when omitted. draft=None with
            target given loads no draft (methods that need one will refuse).
        n_threads, n_batch, n_ubatch: passed to llama.cpp.
        n_gpu_layers: layers of each model offloaded where llama.cpp was
            built for a GPU (CUDA, Metal, Vulkan): -1, the default, offloads
            all, as llama.cpp's own default and Ollama do; 0 keeps both
            models on the CPU. A CPU build ignores it.
        draft_quant, draft_layers: a draft built for scoring, made once from
            the draft's file and cached (`pyspec_gguf.derive`): its weights
            requantized (e.g. "q4_0", whose CPU kernels prefill fastest) and/or
            cut to its first `draft_layers` layers (their attention is exactly
            the full draft's; its drafted tokens are not).
        flash_attn: "auto" (llama.cpp's default: on wherever the backend
            supports it, the CPU included), "on" or "off", for every context
            of both models. Attention capture works either way: with it off
            the softmax llama.cpp computes is read, with it on the
            observation rows' softmax is computed from the queries and the
            cached keys; the two agree within noise (docs/architecture.md).
            Results are reproducible for one setting; two computations of
            the same prompt in different batch shapes (a cached prefix and a
            cold prefill) agree to the last bit only with it off.
    """

    def __init__(self, draft: Optional[str] = "", target: Optional[str] = None, n_threads: int = 0,
                 n_batch: int = 512, n_ubatch: int = 512, n_gpu_layers: int = -1, flash_attn: str = "auto",
                 draft_quant: Optional[str] = None, draft_layers: int = 0, progress: bool = True):
        check_session_options(n_threads, n_gpu_layers, flash_attn, draft_quant, draft_layers)
        target = target or registry.default_model("target")
        if draft is not None:
            draft = draft or registry.default_model("draft")
        for spec in (target, draft):  # a bad spec is refused before either model loads
            if spec is not None:
                registry.check_model_spec(spec)
        self.context_options = {"n_threads": n_threads or default_threads(), "n_batch": n_batch,
                                "n_ubatch": n_ubatch, "flash_attn": flash_attn}
        self.n_gpu_layers = n_gpu_layers
        self.speeds: Optional[SpeedBook] = None  # the models' measured speeds, loaded when "auto" first needs them
        self._speed_keys: dict = {}
        self.target = Model(target, n_gpu_layers=n_gpu_layers, progress=progress)
        self.draft = None
        try:
            if draft is not None:
                if draft_quant or draft_layers:
                    draft = str(derived_draft(registry.resolve(draft, progress), draft_quant, draft_layers,
                                              n_threads))
                # one file as both models is loaded once (e.g. the draft alone, in front of an upstream engine)
                self.draft = (self.target if draft == target else
                              Model(draft, n_gpu_layers=n_gpu_layers, progress=progress))
                if self.draft.vocab_fingerprint() != self.target.vocab_fingerprint():
                    raise ValueError(f"the draft ({self.draft.path}) and target ({self.target.path}) tokenizers "
                                     "differ: the draft's token positions would not match the target's")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for model in {id(m): m for m in (self.draft, self.target) if m is not None}.values():
            model.close()

    def __enter__(self) -> "SpecSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ public

    def tokenize(self, prompt: Prompt) -> np.ndarray:
        if isinstance(prompt, np.ndarray):
            if prompt.ndim != 1 or len(prompt) == 0 or not np.issubdtype(prompt.dtype, np.integer):
                raise ValueError("a token-id prompt must be a non-empty 1-D array of integers")
            if prompt.min() < 0 or prompt.max() >= self.target.n_vocab:
                raise ValueError(f"token ids must be in [0, {self.target.n_vocab})")
            return prompt.astype(np.int32)
        return self.target.tokenize_prompt(prompt)

    def prompt_positions(self, prompt: Prompt, protect_last: int = 0) -> tuple:
        """(tokens, protected): the prompt's tokens and the positions every
        method keeps, the chat template's control tokens, its closing tail
        (end of turn, the assistant's header) and the last `protect_last`
        tokens."""
        if isinstance(protect_last, bool) or not isinstance(protect_last, int) or protect_last < 0:
            raise ValueError(f"protect_last must be an integer >= 0, not {protect_last!r}")
        tokens = self.tokenize(prompt)
        protect_last = max(protect_last, self.template_tail(prompt, tokens))
        return tokens, self.protected_positions(tokens, protect_last)

    def generate(self, prompt: Prompt, method: Union[str, Method] = "specpc", budget: Union[int, float] = 1024,
                 max_tokens: int = 128, stream: bool = False, sampling: Sampling = Sampling(),
                 protect_last: int = 0, progress: Optional[Callable[[int, int], None]] = None,
                 stop: Sequence[str] = (), speculative: str = speculate.DEFAULT, **method_options):
        """Answer `prompt` (text or chat messages) with `method` at `budget`
        tokens (an int) or fraction of the prompt (a float in (0, 1)); the
        answer ends before the first of the `stop` strings, if any.

        Returns a Result; with stream=True, a Stream that yields text pieces
        and holds the Result once exhausted. `progress(done, total)` is
        called within each prefill and the draft's lookahead; a progress
        object with a `stage(name)` method is also told each stage as it
        begins (`passes.STAGES`: draft_prefill, lookahead, scoring,
        target_prefill, eviction). `protect_last` tokens at the end
        (e.g. the question) are always kept, as are the chat template's
        control tokens.

        `speculative` drafts the answer for the target to verify, a few
        tokens per batch (`pyspec_gguf.speculate`): "lookup" from the
        whole prompt and the answer so far, "draft" with the draft model
        (from its context of the whole prompt), "auto" step by step a plain
        step, the lookup or the draft (where the method read the prompt with
        it), whichever it expects the most tokens per second of, "off" not
        at all. Greedy answers are the same either way, but for a near-tie
        that a batch's rounding decides the other way.
        """
        stream_ = self.stream(prompt, method, budget, max_tokens, sampling, protect_last, progress,
                              method_options, stop=stop, speculative=speculative)
        return stream_ if stream else stream_.run()

    def document(self, source, name: Optional[str] = None, progress: Optional[Callable[[int, int], None]] = None,
                 cache: bool = True, read: bool = True, reuse_kept: bool = False) -> "Document":
        """A document to ask questions about: `source` is its text or the
        path of a .txt, .md, .pdf or .html file. The draft reads it now
        (from a state saved by `Document.save` where one matches and
        `cache`), or with the first question that needs it if not `read`;
        each question then costs the draft only its new tokens. With
        `reuse_kept`, a prompt-side question's target also keeps the KV of
        the document tokens kept so far. See `pyspec_gguf.document`."""
        from .document import Document
        from .sources import read_source
        text, source_name = read_source(source)
        return Document(self, text, name=name or source_name, progress=progress, cache=cache, read=read,
                        reuse_kept=reuse_kept)

    def stream(self, prompt: Prompt, method: Union[str, Method], budget, max_tokens: int, sampling: Sampling,
               protect_last: int, progress, method_options: dict, caches=None,
               stop: Sequence[str] = (), speculative: str = speculate.DEFAULT) -> "Stream":
        """A validated call, not yet run: what `generate`, a document's
        questions and the server go through. The answer ends before the
        first of the `stop` strings. `caches`: the prefix caches to reuse,
        `pipeline.Caches` or another source of them (see there)."""
        speculate.check_mode(speculative)
        call = self._call(prompt, method, budget, protect_last, method_options, max_tokens, caches, progress)
        stop = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        return Stream(self, call.method, call.tokens, call.budget, max_tokens, sampling, call.protected, progress,
                      call.caches, stop, call.choice, speculative)

    def compress(self, prompt: Union[str, Sequence[dict]], budget: Union[int, float] = 1024,
                 method: Union[str, Method] = "specpc", protect_last: int = 0, marker: str = " …",
                 progress: Optional[Callable[[int, int], None]] = None, caches=None,
                 **method_options) -> "Compressed":
        """The text of the prompt tokens `method` keeps, for any engine to
        answer from: text for text, chat messages for messages (each
        message's content shortened, the roles and order kept), with
        `marker` where tokens were dropped ("" to join the kept runs).
        `method` must select prompt tokens (specpc, specprefill, selfinfo,
        headtail). `caches`: prefix caches to reuse (`pipeline.Caches`). See
        `pyspec_gguf.compress`."""
        from .compress import check_compressible, compress
        if isinstance(method, str):
            method, method_options = make_method(method, **method_options), {}
        check_compressible(method)  # before "auto" could become full
        call = self._call(prompt, method, budget, protect_last, method_options, caches=caches)
        return compress(self, prompt, call, marker, progress, call.caches)

    def _call(self, prompt: Prompt, method: Union[str, Method], budget, protect_last: int, method_options: dict,
              max_tokens: Optional[int] = None, caches: Optional[Caches] = None, progress=None) -> "Call":
        """Validate a call's arguments and tokenize its prompt; "auto"
        becomes the method it chooses, counting what `caches` hold."""
        if isinstance(method, str):
            method = make_method(method, **method_options)
        elif method_options:
            raise ValueError("method options go with a method name, not a method object")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, not {max_tokens!r}")
        if method.uses_draft and self.draft is None:
            raise ValueError(f"{method.name} needs a draft model; this session has none")
        tokens, protected = self.prompt_positions(prompt, protect_last)
        self.check_fits(len(tokens), max_tokens or 0, method)
        n_budget = resolve_budget(budget, len(tokens))
        if method.stage != "none" and len(protected) >= n_budget and len(tokens) > n_budget:
            raise ValueError(f"budget {n_budget} leaves no room beyond the {len(protected)} protected tokens "
                             "(chat template control tokens and protect_last)")
        source, choice = caches if caches is not None else Caches(), None
        if method.name == "auto":
            method, choice = self.choose(method, tokens, n_budget, *source.cached(tokens), progress)
        return Call(method, tokens, n_budget, protected, source.caches(tokens, method), choice)

    def choose(self, auto: Method, tokens: np.ndarray, budget: int, draft_cached: int = 0, target_cached: int = 0,
               progress=None) -> tuple:
        """(method, Choice): what `auto` (the methods.Auto) becomes for
        this prompt at `budget` tokens, `full` or `specpc`, whichever is
        predicted to reach the first token sooner from each model's measured
        prefill speed (`pyspec_gguf.speed`; measured once, the first time it
        is needed), counting the prompt tokens each model's prefix cache
        already holds."""
        n, specpc = len(tokens), auto.way("specpc")
        kept = specpc.prompt_budget(budget)
        if self.draft is None:
            return auto.way("full"), Choice("full", reason="no draft model")
        if n <= kept:
            return auto.way("full"), Choice("full", reason=f"the prompt fits the budget of {kept} tokens")
        book = self._speed_book()
        unmeasured = {self._speed_key(which) for which in ("draft", "target")
                      if book.get(self._speed_key(which)) is None}  # one key where both are one file
        draft, target = self.speed("draft", progress), self.speed("target", progress)
        calibrated = sum(book.get(key).calibration_s for key in unmeasured)
        draft_cached, target_cached = min(n - 1, draft_cached), min(n - 1, target_cached)
        predicted = {"full": target.prefill_s(n - target_cached, target_cached),
                     "specpc": draft.prefill_s(n - draft_cached, draft_cached)
                     + draft.lookahead_s(specpc.lookahead, n) + target.prefill_s(kept)}
        name = min(predicted, key=predicted.get)
        return auto.way(name), Choice(name, {k: round(v, 2) for k, v in predicted.items()},
                                      calibration_s=round(calibrated, 2))

    def speed(self, which: str, progress=None) -> ModelSpeed:
        """The draft's or the target's measured speed under this session's
        engine setting, calibrated now where none is stored."""
        key = self._speed_key(which)
        speed = self._speed_book().get(key)
        if speed is None:
            log.info("measuring the %s's prefill speed on this machine (once for this model and setting)", which)
            stage = getattr(progress, "stage", None)
            if stage is not None:
                stage(f"calibrate_{which}")
            speed = calibrate(self.draft if which == "draft" else self.target, self.context_options, progress)
            self.speeds.put(key, speed)
        return speed

    def _speed_book(self) -> SpeedBook:
        if self.speeds is None:
            self.speeds = SpeedBook()
        return self.speeds

    def _speed_key(self, which: str) -> str:
        """The draft's or the target's key in the speed book (the same for
        the session's life: the models stay loaded)."""
        if which not in self._speed_keys:
            model = self.draft if which == "draft" else self.target
            # a CPU build offloads nothing, whatever n_gpu_layers says
            offloaded = self.n_gpu_layers if model.kv_on_device else 0
            self._speed_keys[which] = speed_key(model, self.context_options, offloaded)
        return self._speed_keys[which]

    def observe(self, method: Method, stats: "Stats") -> None:
        """Add a finished call's stage times (of `full` or `specpc`) to the
        measurements of the models calibrated already: the predictions then
        follow the lengths this machine sees."""
        if method.name not in ("full", "specpc"):
            return
        t, n = stats.times, stats.prompt_tokens
        if method.name == "full":
            changes = {"target": lambda s: s.observe_prefill(n - stats.target_cached, stats.target_cached,
                                                             t["target_prefill"])}
        else:
            changes = {"target": lambda s: s.observe_prefill(stats.kept_tokens - stats.target_cached,
                                                             stats.target_cached, t["target_prefill"])}
            if t["draft_prefill"] > 0 and self.draft is not None:
                def draft(s: ModelSpeed) -> None:
                    s.observe_prefill(n - stats.draft_cached, stats.draft_cached, t["draft_prefill"])
                    s.observe_lookahead(method.lookahead, n, t["lookahead"])
                changes["draft"] = draft
        self._speed_book().update({self._speed_key(which): change for which, change in changes.items()})

    def check_fits(self, n_prompt: int, max_tokens: int, method: Optional[Method] = None) -> None:
        """A prompt and its answer within what the models were trained for
        (else `PromptTooLong`, a ValueError, whose `param` says which of the
        two to shorten)."""
        what = f"the prompt ({n_prompt:,} tokens)"
        self.target.check_fits(n_prompt + (1 if max_tokens else 0), what + (" with its answer" if max_tokens else ""))
        room = self.answer_room(n_prompt)
        if max_tokens and room is not None and max_tokens > room:
            raise PromptTooLong(f"max_tokens {max_tokens:,} does not fit: {what} leaves room for {room:,} answer "
                                f"tokens in the {self.target.context_limit:,} of {self.target.name}; ask for at "
                                "most that many, or use a shorter document", param="max_tokens")
        if self.draft is not None and (method is None or method.uses_draft):
            self.draft.check_fits(n_prompt, what)

    def answer_room(self, n_prompt: int) -> Optional[int]:
        """How many answer tokens fit after a prompt of n_prompt tokens
        (None: the model declares no limit)."""
        limit = self.target.context_limit
        return limit - n_prompt if limit else None

    # ------------------------------------------------------------ helpers

    def template_tail(self, prompt: Prompt, tokens: np.ndarray) -> int:
        """How many tokens the chat template adds after the last message's
        content (end of turn, the assistant's header): found as the common
        tail of the prompt and the same prompt with that content emptied."""
        if isinstance(prompt, (str, np.ndarray)):
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


class Cancelled(Exception):
    """The caller cancelled an answer (`Stream.cancel`)."""


@dataclass
class Call:
    """A validated call: the method, the prompt's tokens, the budget in
    tokens and the positions always kept."""

    method: Method
    tokens: np.ndarray
    budget: int
    protected: np.ndarray
    caches: Optional[Caches] = None  # the prefix caches its passes reuse
    choice: Optional[Choice] = None  # what "auto" chose, where the call named it


def check_session_options(n_threads: int = 0, n_gpu_layers: int = -1, flash_attn: str = "auto",
                          draft_quant: Optional[str] = None, draft_layers: int = 0) -> None:
    """SpecSession's engine options, checked before any model loads."""
    def integer(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not integer(n_threads) or n_threads < 0:
        raise ValueError(f"threads must be >= 0 (0: all cores), not {n_threads!r}")
    if not integer(n_gpu_layers) or n_gpu_layers < -1:
        raise ValueError(f"n_gpu_layers must be >= -1 (-1: all layers), not {n_gpu_layers!r}")
    if flash_attn not in ("off", "on", "auto"):
        raise ValueError(f"flash_attn must be 'off', 'on' or 'auto', not {flash_attn!r}")
    if draft_quant and draft_quant.lower() not in QUANTS:
        raise ValueError(f"draft_quant must be one of {', '.join(QUANTS)}, not {draft_quant!r}")
    if not integer(draft_layers) or draft_layers < 0:
        raise ValueError(f"draft_layers must be >= 0 (0: all layers), not {draft_layers!r}")


def check_budget(budget) -> None:
    """A budget is a token count (an int >= 1) or a fraction of the prompt
    (a float in (0, 1)); anything else is refused before any model loads."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise ValueError(f"budget must be a token count (int) or a fraction in (0, 1) (float), not {budget!r}")
    if budget <= 0:
        raise ValueError(f"budget {budget} keeps nothing: give a token count (e.g. 1024) or a fraction of the "
                         "prompt in (0, 1) (e.g. 0.25)")
    if isinstance(budget, (float, np.floating)) and budget >= 1.0:
        raise ValueError(f"a fractional budget must be in (0, 1), not {budget}; a token count is an int")


def resolve_budget(budget, n_prompt: int) -> int:
    """The budget in tokens for a prompt of n_prompt tokens."""
    check_budget(budget)
    if isinstance(budget, (float, np.floating)):
        return max(1, int(round(budget * n_prompt)))
    return int(budget)


class Stream:
    """Text pieces of the answer as they are generated; `.result` after.
    The passes run on the first step of the iteration. `on_result` is called
    with the Result of an answer that ran to its end. `cancel` (from any
    thread) ends the passes or the decoding at their next step with
    `Cancelled`, and gives back every context the answer made."""

    def __init__(self, session: "SpecSession", method: Method, tokens: np.ndarray, budget: int, max_tokens: int,
                 sampling: Sampling, protected: np.ndarray, progress, caches=None, stop: Sequence[str] = (),
                 choice: Optional[Choice] = None, speculative: str = "off"):
        self._session, self._method, self._tokens = session, method, tokens
        self._choice = choice
        self._speculative, self._drafting = speculative, self._speculation(speculative)
        self._budget, self._max_tokens, self._sampling = budget, max_tokens, sampling
        self._protected, self._progress, self._caches = protected, progress, caches
        self._stop = list(stop)
        self._cancelled = False
        self.result: Optional[Result] = None
        self.on_result: Optional[Callable[[Result], None]] = None

    @property
    def method(self) -> Method:
        return self._method

    @property
    def prompt_tokens(self) -> np.ndarray:
        return self._tokens

    def cancel(self) -> None:
        self._cancelled = True

    def _speculation(self, mode: str) -> bool:
        """Whether the draft model drafts the answer: for "draft", and for
        "auto" where the method read the prompt with it (its context is at
        hand); never where there is none or it answers itself."""
        draft = self._session.draft is not None and not self._method.answers_with_draft
        if mode == "draft" and not draft:
            raise ValueError("speculative='draft' needs a draft model other than the one answering")
        return mode == "draft" or (mode == "auto" and draft and self._method.uses_draft)

    def _drafter(self, analysis: Analysis, counts: speculate.SpecCounts):
        """What drafts the answer (None: nothing); the draft model's context
        only where `_speculation` said it drafts."""
        if self._speculative == "off":
            return None
        if not self._drafting:
            return speculate.make_drafter(self._speculative, self._tokens, counts=counts)
        session = self._session
        return speculate.make_drafter(self._speculative, self._tokens, analysis.draft_context(), counts,
                                      speculate.step_cost(session.draft, session.target))

    def _check(self) -> None:
        if self._cancelled:
            raise Cancelled("the answer was cancelled")


    def run(self) -> Result:
        """The whole answer at once."""
        for _ in self:
            pass
        return self.result

    def __iter__(self) -> Iterator[str]:
        t0, moved = time.perf_counter(), transfers()
        self._check()
        analysis = Analysis(self._session, self._tokens, self._protected, self._max_tokens, [self._method],
                            progress=CheckedProgress(self._progress, self._check), caches=self._caches,
                            draft_room=self._max_tokens + speculate.K_MAX + 1 if self._drafting else 0)
        prepared = None
        try:
            prepared = analysis.prepare(self._method, self._budget)
            answer, model = prepared.answer, prepared.model
            tokens, first = [], None
            counts = speculate.SpecCounts()
            drafter = self._drafter(analysis, counts)
            if drafter is None:
                generated = answer.context.generate(self._max_tokens, self._sampling, seq=answer.seq)
            else:
                generated = speculate.generate(answer.context, answer.seq, drafter, self._max_tokens,
                                               self._sampling, model.is_eog, counts)

            def counted():
                nonlocal first
                for tok in generated:
                    self._check()
                    if first is None:
                        first = time.perf_counter()
                    tokens.append(tok)
                    yield tok

            t_dec = time.perf_counter()
            stops = StopScanner(self._stop)
            text = []
            for piece in iter_text(model, counted()):
                piece = stops.feed(piece)
                if piece:
                    text.append(piece)
                    yield piece
                if stops.stopped:
                    break
            tail = stops.flush()
            if tail:
                text.append(tail)
                yield tail
            t_end = time.perf_counter()
            times = analysis.clock.times
            times["decode"] = t_end - t_dec
            caches = analysis.caches
            stats = Stats(method=self._method.name, prompt_tokens=len(self._tokens), kept_tokens=prepared.cells,
                          budget=self._budget, generated_tokens=len(tokens), times=times,
                          ttft_s=(first or t_end) - t0,
                          decode_tok_s=(len(tokens) - 1) / (t_end - first) if first and len(tokens) > 1
                          and t_end > first else float("nan"),
                          target_kv_bytes=prepared.cells * model.kv_bytes_per_token,
                          peak_rss_bytes=peak_rss(),
                          draft_cached=caches.draft.reused if caches.draft and analysis.used_draft_cache else 0,
                          target_cached=caches.target.reused if caches.target and analysis.used_target_cache
                          else caches.kept.reused if caches.kept and analysis.used_kept_cache else 0,
                          auto=asdict(self._choice) if self._choice else None,
                          speculative=self._speculative, drafted=counts.drafted, accepted=counts.accepted,
                          verify_steps=counts.steps, draft_decodes=counts.draft_decodes,
                          draft_kv_bytes=len(self._tokens) * self._session.draft.kv_bytes_per_token
                          if self._drafting else 0,
                          transfers=transfers_since(moved))
            self._session.observe(self._method, stats)
            ran_out = len(tokens) == self._max_tokens and not stops.stopped
            self.result = Result(text="".join(text), tokens=tokens, stats=stats, kept=prepared.kept,
                                 scores=prepared.scores, prompt_tokens=self._tokens,
                                 kept_per_head=prepared.kept_per_head,
                                 finish_reason="length" if ran_out else "stop")
        finally:
            if prepared is not None:
                prepared.answer.close()
            analysis.close()
        if self.on_result is not None:
            self.on_result(self.result)


class CheckedProgress:
    """A call's progress callback, with a cancellation check at each step:
    (done, total) within a prefill or the lookahead, `stage(name)` as each
    stage begins (passed on where the callback has a `stage` too)."""

    def __init__(self, progress: Optional[Callable[[int, int], None]], check: Callable[[], None]):
        self._progress, self._check = progress, check

    def __call__(self, done: int, total: int) -> None:
        self._check()
        if self._progress is not None:
            self._progress(done, total)

    def stage(self, name: str) -> None:
        self._check()
        stage = getattr(self._progress, "stage", None)
        if stage is not None:
            stage(name)


class StopScanner:
    """Cuts a stream of text at the first of its stop strings: `feed` gives
    back what is safe to show (holding back a tail that may begin a stop
    string), `flush` the held tail once the stream ends without one."""

    def __init__(self, stop: Sequence[str]):
        self.stop, self.stopped, self._held = list(stop), False, ""

    def feed(self, piece: str) -> str:
        if not self.stop or self.stopped:
            return "" if self.stopped else piece
        text = self._held + piece
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped, self._held = True, ""
            return text[: min(cuts)]
        hold = max((k for s in self.stop for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)
        self._held = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held
