"""What a worker does for a request: answer it, or compress its prompt,
through the same `SpecSession` calls as the Python API, with the worker's
prefix caches and the server's default policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from .. import speculate
from ..methods import make_method
from ..document import question_protect
from ..session import Cancelled, resolve_budget
from .protocol import Request


@dataclass
class Policy:
    """The server's defaults: `method` at `budget` ("auto": per prompt,
    `full` or `specpc`, whichever is predicted faster); prompts shorter than
    `min_prompt_tokens`, where given, always go through `full`;
    `max_tokens` and `speculative` for a request that names none."""

    method: str = "auto"
    budget: Union[int, float] = 0.25
    method_options: dict = field(default_factory=dict)
    min_prompt_tokens: Optional[int] = None
    max_tokens: int = 512
    speculative: str = speculate.DEFAULT

    def __post_init__(self):
        make_method(self.method, **self.method_options)  # a bad default fails at start, not per request
        speculate.check_mode(self.speculative)

    def max_tokens_for(self, req: Request, session, n_prompt: int) -> int:
        """The request's max_tokens; where it names none, the default cut to
        the room the prompt leaves in the model's context (as OpenAI's API
        and llama-server do), so that a prompt that fits is answered."""
        if req.max_tokens is not None:
            return req.max_tokens
        room = session.answer_room(n_prompt)
        return self.max_tokens if room is None else max(1, min(self.max_tokens, room))

    def choose(self, req: Request, n_prompt: int) -> tuple:
        """(method name, its options, budget) for a request."""
        budget = self.budget if req.budget is None else req.budget
        if req.method is not None:
            return req.method, req.method_options, budget
        if self.min_prompt_tokens is not None and n_prompt < self.min_prompt_tokens:
            return "full", {}, budget
        return self.method, self.method_options, budget


def answer(req: Request, policy: Policy):
    """The job answering a chat or completion request: events "ready" (the
    call checked, about to run), "text" pieces, "done" with the Result."""

    def work(worker, job) -> None:
        session = worker.session
        tokens = session.tokenize(req.prompt)
        name, options, budget = policy.choose(req, len(tokens))
        stream = session.stream(req.prompt, name, budget, policy.max_tokens_for(req, session, len(tokens)),
                                req.sampling, req.protect_last, None, options, worker, req.stop,
                                req.speculative or policy.speculative)
        job.attach(stream)
        job.post("ready")
        for piece in stream:
            job.post("text", piece)
        job.post("done", stream.result)

    return work


def compress(req: Request, policy: Policy):
    """The job compressing a prompt: one "done" event with the Compressed."""

    def work(worker, job) -> None:
        job.post("done", _compressed(worker, job, req, policy, req.protect_last))

    return work


def forward(req: Request, policy: Policy):
    """The job of the front of an upstream engine: one "done" event with
    the prompt as the upstream gets it and the figures that say so
    (`Forwarded`). A prompt is compressed where it reaches the policy's
    `min_prompt_tokens` and exceeds the budget, else passed unchanged; the
    last message's last paragraph (the question, as a rule) is always kept."""

    def work(worker, job) -> None:
        session = worker.session
        n = len(session.tokenize(req.prompt))
        budget = policy.budget if req.budget is None else req.budget
        below = policy.min_prompt_tokens is not None and n < policy.min_prompt_tokens and req.method is None
        if below or n <= resolve_budget(budget, n):
            job.post("done", Forwarded(req.prompt, {"compressed": False, "prompt_tokens": n}))
            return
        # the question, within half the budget (a prompt without blank lines is one paragraph)
        protect = req.protect_last or min(question_protect(session.target, last_paragraph(req.prompt)),
                                          resolve_budget(budget, n) // 2)
        compressed = _compressed(worker, job, req, policy, protect)
        job.post("done", Forwarded(compressed.prompt, {
            "compressed": True, "method": compressed.method, "prompt_tokens": compressed.prompt_tokens,
            "kept_tokens": compressed.kept_tokens, "compressed_tokens": compressed.compressed_tokens,
            "draft_cached": compressed.draft_cached, "times": dict(compressed.times)}))

    return work


@dataclass
class Forwarded:
    prompt: Union[str, list]  # messages or text, as the upstream gets them
    figures: dict             # the response's `pyspec`: compressed or not, the token counts, the draft's time


def last_paragraph(prompt: Union[str, list]) -> str:
    """The text after the last blank line of the prompt's last message (or
    of the text): where a question about a pasted document sits."""
    text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
    return text.rstrip().rsplit("\n\n", 1)[-1]


def _compressed(worker, job, req: Request, policy: Policy, protect_last: int):
    """`req`'s prompt cut by its method (the policy's where it names none;
    a method that keeps prompt tokens, specpc in place of auto or of one
    that drops KV entries, which have no text)."""
    default = make_method(policy.method, **policy.method_options)
    if req.method is not None:
        name, options = req.method, req.method_options
    elif default.name == "auto":  # compressing is what is asked: auto's compressing way
        name, options = "specpc", policy.method_options
    elif default.prompt_stage is not None and default.kv_stage is None:
        name, options = policy.method, policy.method_options
    else:
        name, options = "specpc", {}
    budget = policy.budget if req.budget is None else req.budget

    def progress(done, total):
        if job.cancelled.is_set():
            raise Cancelled("the compression was cancelled")

    return worker.session.compress(req.prompt, budget, name, protect_last, req.marker, progress, worker, **options)
