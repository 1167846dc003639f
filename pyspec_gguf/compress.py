"""Compressed prompts for any engine: the text of the tokens a prompt
method keeps.

    with SpecSession() as s:
        short = s.compress(messages, budget=1024)    # SpecPC by default
        ollama.chat(model, messages=short.messages)   # or llama-server, LM Studio, ...

The prompt goes through the same passes as `generate` up to the prompt
stage's selection; the kept token positions are then mapped back onto the
text they spell. For chat messages each message's content is cut on its
own (roles, order and the chat template stay the engine's business); the
template's own tokens are never part of the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np

from .passes import Clock
from .pipeline import Analysis


@dataclass
class Compressed:
    """A compressed prompt: `prompt` has the input's shape (text, or a list
    of chat messages); `kept` are the positions of the original prompt's
    tokens that it spells."""

    prompt: Union[str, list]
    kept: np.ndarray
    prompt_tokens: int          # tokens of the original prompt
    compressed_tokens: int      # tokens of the compressed prompt, as the target tokenizes it
    method: str
    times: dict = field(default_factory=dict)
    draft_cached: int = 0       # prompt tokens the draft found in its prefix cache (not read again)

    @property
    def messages(self) -> list:
        if isinstance(self.prompt, str):
            raise ValueError("a text prompt was compressed; its result is .text")
        return self.prompt

    @property
    def text(self) -> str:
        """The compressed text (for messages, their contents one after the other)."""
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n\n".join(m["content"] for m in self.prompt)

    @property
    def kept_tokens(self) -> int:
        return len(self.kept)

    def to_dict(self) -> dict:
        out = {"messages" if isinstance(self.prompt, list) else "prompt": self.prompt}
        return {**out, "method": self.method, "prompt_tokens": self.prompt_tokens,
                "kept_tokens": self.kept_tokens, "compressed_tokens": self.compressed_tokens,
                "times": dict(self.times)}


def check_compressible(method) -> None:
    """Only a method that selects prompt tokens, and nothing after, gives a
    text to compress to."""
    if method.prompt_stage is None or method.kv_stage is not None or method.name == "auto":
        raise ValueError(f"{method.name} does not select prompt tokens; compress with a prompt method "
                         "(specpc, specprefill, selfinfo, headtail)")


def compress(session, prompt, call, marker: str, progress=None, caches=None) -> Compressed:
    """`SpecSession.compress` after validation: `call` holds the method,
    tokens, budget and protected positions; `caches` the prefix caches the
    draft's pass may reuse."""
    method = call.method
    check_compressible(method)
    if not isinstance(marker, str):
        raise ValueError(f"marker must be a string, not {marker!r}")
    clock = Clock()
    analysis = Analysis(session, call.tokens, call.protected, 0, [method], progress=progress, clock=clock,
                        caches=caches)
    try:
        kept, _ = analysis.select_prompt(method, call.budget)
    finally:
        analysis.close()
    compressed = from_kept(session, prompt, call.tokens, kept, marker, method.name)
    compressed.times = {k: v for k, v in clock.times.items() if v}
    if caches is not None and caches.draft is not None and analysis.used_draft_cache:
        compressed.draft_cached = caches.draft.reused
    return compressed


def from_kept(session, prompt, tokens: np.ndarray, kept: np.ndarray, marker: str = " …",
              method: str = "") -> Compressed:
    """The compressed prompt that spells the tokens at `kept` of `prompt`
    (whose tokens are `tokens`): e.g. a SpecPC answer's `Result.kept`."""
    target = session.target
    if isinstance(prompt, str):
        rendered = prompt
        spans = [(0, len(prompt.encode()))]
    else:
        rendered = target.apply_chat_template(list(prompt))
        spans = content_spans(rendered, [m["content"] for m in prompt])
    data = rendered.encode()
    starts, ends = token_spans(target, tokens, data)
    keep = np.zeros(len(tokens), bool)
    keep[kept] = True
    texts = [cut(data, a, b, starts, ends, keep, marker) for a, b in spans]
    out = texts[0] if isinstance(prompt, str) else [{**m, "content": t} for m, t in zip(prompt, texts)]
    return Compressed(out, np.asarray(kept, np.int32), len(tokens), len(session.tokenize(out)), method)


def token_spans(model, tokens: np.ndarray, text: bytes) -> tuple:
    """Byte offsets [start, end) of each token in the text it was made from.
    A control token the tokenizer added (not in the text) spans nothing."""
    starts, ends = np.zeros(len(tokens), np.int64), np.zeros(len(tokens), np.int64)
    pos = 0
    for i, t in enumerate(tokens):
        piece = model.token_bytes(int(t), special=True)
        if piece and text.startswith(piece, pos):
            starts[i], ends[i] = pos, pos + len(piece)
            pos += len(piece)
        elif model.is_control(int(t)):
            starts[i] = ends[i] = pos
        else:
            raise ValueError("this model's tokens do not spell back the prompt's text byte for byte; "
                             "its prompts cannot be compressed to text")
    return starts, ends


def content_spans(rendered: str, contents: list) -> list:
    """Byte ranges of each message's content in the rendered template,
    found in order."""
    data, spans, pos = rendered.encode(), [], 0
    for content in contents:
        needle = content.encode()
        at = data.find(needle, pos)
        if at < 0 and content.strip():
            needle = content.strip().encode()  # templates may trim the content
            at = data.find(needle, pos)
        if at < 0:
            raise ValueError("a message's content is not in the chat template's rendering; "
                             "this template rewrites the messages and cannot be compressed")
        spans.append((at, at + len(needle)))
        pos = at + len(needle)
    return spans


def cut(text: bytes, a: int, b: int, starts: np.ndarray, ends: np.ndarray, keep: np.ndarray, marker: str) -> str:
    """The kept tokens' text within bytes [a, b), with `marker` for each run
    of dropped tokens (before, between or after the kept ones); "" when
    nothing in the range is kept."""
    out, dropped, mark = bytearray(), False, marker.encode()
    for i in np.flatnonzero((ends > a) & (starts < b) & (ends > starts)):
        if keep[i]:
            if dropped:
                out += mark
                dropped = False
            out += text[max(starts[i], a): min(ends[i], b)]
        else:
            dropped = True
    if dropped and out:
        out += mark
    # a run may begin or end inside a character: its stray bytes go
    return out.decode("utf-8", errors="ignore")
