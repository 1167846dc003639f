"""What a worker does for a request: answer it, or compress its prompt,
through the same `SpecSession` calls as the Python API, with the worker's
prefix caches and the server's default policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from .. import speculate
from ..methods import make_method
from ..session import Cancelled
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
        default = make_method(policy.method, **policy.method_options)
        if req.method is not None:
            name, options = req.method, req.method_options
        elif default.name == "auto":  # compressing is what is asked: auto's compressing way
            name, options = "specpc", policy.method_options
        elif default.prompt_stage is not None and default.kv_stage is None:
            name, options = policy.method, policy.method_options
        else:  # the default drops KV entries, which have no text
            name, options = "specpc", {}
        budget = policy.budget if req.budget is None else req.budget

        def progress(done, total):
            if job.cancelled.is_set():
                raise Cancelled("the compression was cancelled")

        compressed = worker.session.compress(req.prompt, budget, name, req.protect_last, req.marker, progress,
                                             worker, **options)
        job.post("done", compressed)

    return work
