"""A GGUF model and its contexts: the Python face of the native core.

``Model`` owns a llama.cpp model, ``Context`` a llama.cpp context with its KV
cache. They add what is easier in Python than in C++: chunked prefill with
progress, the generation loop with UTF-8-safe streaming, numpy in and out.
"""

from __future__ import annotations

import codecs
import os
import weakref
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from . import _log  # noqa: F401  (routes llama.cpp's log before anything loads)
from . import _native
from .registry import resolve, sha256_file

Messages = Sequence[dict]
Progress = Callable[[int, int], None]


class PromptTooLong(ValueError):
    """A prompt (param "prompt"), or a prompt with its answer (param
    "max_tokens"), longer than a model's trained context."""

    def __init__(self, message: str, param: str = "prompt"):
        super().__init__(message)
        self.param = param


def transfers() -> dict:
    """Copies between llama.cpp's buffers and the host so far in this
    process, by kind ("state_read", "state_write", "capture_read",
    "capture_write"), each
    [calls, bytes]: on a GPU build with the KV cache offloaded every one
    crosses the bus, on the CPU build it is a memory copy."""
    return {kind: list(count) for kind, count in _native.transfers().items()}


def transfers_since(before: dict) -> dict:
    """The copies made since the reading `before` (of `transfers()`)."""
    return {kind: [now[0] - before[kind][0], now[1] - before[kind][1]] for kind, now in transfers().items()}


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class Model:
    """A GGUF model loaded once; contexts are made from it.

    Args:
        spec: a local .gguf path, a registry name or a Hugging Face spec
            (see ``pyspec_gguf.registry``).
        n_gpu_layers: layers to offload when llama-cpp-python was built for a
            GPU (CUDA, Metal, Vulkan); -1, the default, offloads all of them.
    """

    def __init__(self, spec: Union[str, os.PathLike], n_gpu_layers: int = -1, use_mmap: bool = True,
                 progress: bool = True):
        path = resolve(os.fspath(spec), progress=progress)
        self._native = _native.Model(str(path), n_gpu_layers=n_gpu_layers, use_mmap=use_mmap)
        self.path = str(path)
        # its KV cache lives in device memory (a GPU build, layers offloaded)
        self.kv_on_device = n_gpu_layers != 0 and _native.supports_gpu_offload()
        self._sha256: Optional[str] = None
        self._contexts: weakref.WeakSet = weakref.WeakSet()  # closed ones drop out when collected

    # -- lifetime
    def close(self) -> None:
        for ctx in list(self._contexts):
            ctx.close()
        self._native.close()

    @property
    def closed(self) -> bool:
        return self._native.closed

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- shape
    @property
    def n_layer(self) -> int:
        return self._native.n_layer

    @property
    def n_head(self) -> int:
        return self._native.n_head

    @property
    def n_head_kv(self) -> int:
        return self._native.n_head_kv

    @property
    def n_vocab(self) -> int:
        return self._native.n_vocab

    @property
    def n_ctx_train(self) -> int:
        """The context length the model was trained for, as its GGUF says
        (0 where it does not)."""
        value = self.meta(f"{self.meta('general.architecture')}.context_length")
        return int(value) if value.isdigit() else 0

    def sha256(self) -> str:
        """The model file's sha256 (hashed once per process)."""
        if self._sha256 is None:
            self._sha256 = sha256_file(Path(self.path))
        return self._sha256

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def rope_scaling(self) -> tuple:
        """(type, factor, original context) of the RoPE scaling the GGUF
        declares (llama.cpp applies it), or None."""
        arch = self.meta("general.architecture")
        kind = self.meta(f"{arch}.rope.scaling.type")
        try:
            factor = float(self.meta(f"{arch}.rope.scaling.factor") or 0)
        except ValueError:
            factor = 0.0
        if kind in ("", "none") or factor <= 1.0:
            return None
        original = self.meta(f"{arch}.rope.scaling.original_context_length")
        return kind, factor, int(original) if original.isdigit() else self.n_ctx_train

    @property
    def context_limit(self) -> int:
        """The most positions the model attends over as its GGUF declares
        it: the trained context, or what its RoPE scaling stretches that to
        (0: not declared)."""
        scaling = self.rope_scaling
        if scaling is None:
            return self.n_ctx_train
        return max(self.n_ctx_train, int(scaling[2] * scaling[1]))

    def check_fits(self, n_tokens: int, what: str) -> None:
        """Refuse more tokens than the model was trained for (or its declared
        RoPE scaling allows): past it the answers degrade silently
        (llama.cpp only logs a warning)."""
        limit = self.context_limit
        if limit and n_tokens > limit:
            scaling = self.rope_scaling
            how = (f"{limit:,} positions its GGUF declares ({scaling[0]} RoPE scaling, ×{scaling[1]:g} of "
                   f"{scaling[2]:,} trained)" if scaling else f"{limit:,} that it was trained for")
            raise PromptTooLong(f"{what} needs {n_tokens:,} tokens, more than the {how} in {self.name}; use a "
                                "shorter document or a model with a longer context")

    @property
    def per_head_rewritable(self) -> bool:
        """Whether its KV state can be rewritten cell by cell (per head, or
        cut on the host): not recurrent, hybrid, sliding-window or M-RoPE."""
        return self._native.per_head_rewritable

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers (f16 cache)."""
        return self._native.kv_bytes_per_cell

    def meta(self, key: str) -> str:
        return self._native.meta(key)

    # -- text
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> np.ndarray:
        return self._native.tokenize(text, add_special, parse_special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return self._native.detokenize(np.asarray(tokens, dtype=np.int32), special)

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """Render chat messages with the model's own template (llama.cpp's
        built-in template support)."""
        if not messages:
            raise ValueError("messages is empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError("each message must be a dict with 'role' and 'content'")
            if not isinstance(m["role"], str) or not isinstance(m["content"], str):
                raise ValueError(f"message {i}: role and content must be strings")
            if "\0" in m["role"] or "\0" in m["content"]:
                # the template reads C strings: the message, and all after it, would end at the NUL
                raise ValueError(f"message {i} holds a NUL character (U+0000), which no chat template can carry")
        return self._native.apply_chat_template([m["role"] for m in messages],
                                                [m["content"] for m in messages], add_generation_prompt)

    def tokenize_prompt(self, prompt: Union[str, Messages]) -> np.ndarray:
        """Tokens of a plain prompt, or of chat messages through the template."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            tokens = self.tokenize(prompt, add_special=True, parse_special=False)
        else:
            text = self.apply_chat_template(prompt)
            # the template already holds the special tokens it wants
            tokens = self.tokenize(text, add_special=False, parse_special=True)
        if len(tokens) == 0:
            raise ValueError("the prompt has no tokens")
        return tokens

    def is_eog(self, token: int) -> bool:
        return self._native.is_eog(int(token))

    def is_control(self, token: int) -> bool:
        return self._native.is_control(int(token))

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The bytes a token stands for; special: control tokens as their
        text (e.g. "<|im_start|>") rather than nothing."""
        return self._native.token_bytes(int(token), special)

    def vocab_fingerprint(self) -> int:
        return self._native.vocab_fingerprint()

    # -- contexts
    def context(self, n_ctx: int = 4096, n_batch: int = 512, n_ubatch: int = 512, n_threads: int = 0,
                n_seq_max: int = 1, flash_attn: str = "off", type_k: str = "f16", type_v: str = "f16") -> "Context":
        """A new context (the low-level default is 'off'; SpecSession's is
        'auto'). flash_attn: 'off' (attention capture reads the
        softmax), 'on' (capture scores from the queries and cached keys), or
        'auto' (llama.cpp decides; on CPU it turns it on).
        type_k, type_v: KV cache types (f16, q8_0, q4_0, ...; a quantized V
        needs flash_attn='on')."""
        ctx = Context(self, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch,
                      n_threads=n_threads or default_threads(), n_seq_max=n_seq_max, flash_attn=flash_attn,
                      type_k=type_k, type_v=type_v)
        self._contexts.add(ctx)
        return ctx


@dataclass
class Sampling:
    """temperature 0 is greedy decoding."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class Context:
    """A llama.cpp context: KV cache, decoding, capture and KV operations."""

    def __init__(self, model: Model, **params):
        self.model = model
        self._native = _native.Context(model._native, **params)

    def close(self) -> None:
        self._native.close()

    @property
    def closed(self) -> bool:
        return self._native.closed

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name):
        # KV and capture operations are the native ones, unchanged
        if name == "_native":
            raise AttributeError(name)
        return getattr(self._native, name)

    def next_pos(self, seq: int = 0) -> int:
        return self._native.pos_max(seq) + 1

    def prefill(self, tokens: Sequence[int], seq: int = 0, want: str = "last",
                progress: Optional[Progress] = None) -> np.ndarray:
        """Decode ``tokens`` after what ``seq`` holds, n_batch tokens per call.

        want: 'last' (logits of the last token, for sampling), 'none', or
        'logprobs' (returns log p(token[i+1] | tokens[..i]) for every i).
        progress(done, total) is called after each chunk.
        """
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        n = len(tokens)
        if n == 0:
            raise ValueError("nothing to prefill: no tokens")
        free = self._native.n_ctx - self._native.n_cells(seq)
        if n > free:
            raise ValueError(f"the prompt ({n} tokens) does not fit in the context "
                             f"({free} free of n_ctx={self._native.n_ctx})")
        step = self._native.n_batch
        pos = self.next_pos(seq)
        logprobs = []
        for start in range(0, n, step):
            chunk = tokens[start:start + step]
            last_chunk = start + step >= n
            if want == "logprobs":
                # the chunk's last logprob is of the next chunk's first token
                nxt = -1 if last_chunk else int(tokens[start + step])
                logprobs.append(self._native.decode(chunk, pos + start, seq, "logprobs", nxt))
            else:
                self._native.decode(chunk, pos + start, seq, want if last_chunk else "none")
            if progress is not None:
                progress(min(start + step, n), n)
        if want == "logprobs":
            return np.concatenate(logprobs)
        return np.empty(0, dtype=np.float32)

    def generate(self, max_tokens: int, sampling: Sampling = Sampling(), seq: int = 0) -> Iterator[int]:
        """Sample up to ``max_tokens`` tokens after a prefill that asked for
        the last logits; stops at an end-of-generation token (not yielded)."""
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        self._native.set_sampler(sampling.temperature, sampling.top_p, sampling.seed)
        for i in range(max_tokens):
            token = self._native.sample()
            if self.model.is_eog(token):
                return
            yield token
            if i + 1 < max_tokens:
                self._native.decode(np.array([token], dtype=np.int32), self.next_pos(seq), seq, "last")


def iter_text(model: Model, tokens: Iterator[int]) -> Iterator[str]:
    """Turn a token stream into text pieces, never splitting a UTF-8 char."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        piece = decoder.decode(model.token_bytes(token))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
