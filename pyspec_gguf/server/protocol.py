"""The OpenAI wire format: request bodies checked into `Request`s, results
shaped into responses and stream chunks, errors into OpenAI error bodies.

The project's own fields ride along: a request may name `method`,
`budget`, `method_options`, `protect_last` and `speculative` (the `openai` client's
`extra_body`); a response carries `pyspec` (kept tokens, time to first
token by stage, target KV bytes, prefix-cache hits).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from .. import speculate
from ..engine import PromptTooLong, Sampling
from ..methods import make_method
from ..session import check_budget


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def error_from(e: Exception) -> RequestError:
    """The RequestError of a failure inside a job."""
    if isinstance(e, RequestError):
        return e
    if isinstance(e, PromptTooLong):
        return RequestError(str(e), code="context_length_exceeded",
                            param="max_tokens" if e.param == "max_tokens" else "messages")
    if isinstance(e, ValueError):
        return RequestError(str(e))
    return RequestError(f"internal error: {type(e).__name__}: {e}", status=500, kind="server_error")


@dataclass
class Request:
    """A checked request. method None: the server's policy decides."""

    kind: str                        # "chat", "completion" or "compress"
    prompt: Union[str, list]         # text, or chat messages
    method: Optional[str] = None
    budget: Optional[Union[int, float]] = None
    method_options: dict = field(default_factory=dict)
    protect_last: int = 0
    speculative: Optional[str] = None  # None: the server's default
    max_tokens: Optional[int] = None
    sampling: Sampling = field(default_factory=Sampling)
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    marker: str = " …"


def _get(body: dict, key: str, types, default=None, check=None, what: str = ""):
    """body[key] of one of `types` (None or absent: default), checked."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RequestError(f"{key} must be {what}, not {value!r}", param=key)
    if not isinstance(value, types) or (check is not None and not check(value)):
        raise RequestError(f"{key} must be {what}, not {value!r}", param=key)
    return value


def _messages(body: dict) -> list:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a role and a content", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is read
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def _policy_fields(body: dict, req: Request) -> Request:
    """method, budget, method_options, protect_last, speculative: checked, the method
    built once here so that a bad name or option is a 400 before queueing."""
    req.method = _get(body, "method", str, what="a method name")
    req.method_options = _get(body, "method_options", dict, {}, what="an object of method options")
    if req.method_options and req.method is None:
        raise RequestError("method_options go with a method", param="method_options")
    if req.method is not None:
        try:
            make_method(req.method, **req.method_options)
        except ValueError as e:
            raise RequestError(str(e), param="method") from None
    budget = body.get("budget")
    if budget is not None:
        try:
            check_budget(budget)
        except ValueError as e:
            raise RequestError(str(e), param="budget") from None
        req.budget = budget
    req.protect_last = _get(body, "protect_last", int, 0, lambda v: v >= 0, "an integer >= 0")
    req.speculative = _get(body, "speculative", str, None, lambda v: v in speculate.MODES,
                           "one of " + ", ".join(speculate.MODES))
    return req


def _model(body: dict, model_id: Optional[str]) -> None:
    """A request for another model than this server's is a 404 (model_id
    None: any name goes, the upstream's to check)."""
    model = body.get("model")
    if model is not None and model_id is not None and model != model_id:
        raise RequestError(f"the model {model!r} does not exist; this server has {model_id!r}", status=404,
                           param="model", code="model_not_found")


def _generation_fields(body: dict, req: Request) -> Request:
    n = _get(body, "n", int, 1, what="1")
    if n != 1:
        raise RequestError("only n=1 is supported", param="n")
    req.max_tokens = _get(body, "max_completion_tokens", int, None, lambda v: v >= 1, "a positive integer")
    req.max_tokens = _get(body, "max_tokens", int, req.max_tokens, lambda v: v >= 1, "a positive integer")
    number = (int, float)
    temperature = _get(body, "temperature", number, 0.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")
    top_p = _get(body, "top_p", number, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    seed = _get(body, "seed", int, 0, what="an integer")
    req.sampling = Sampling(float(temperature), float(top_p), seed & 0xFFFFFFFF)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a string or a list of up to 4 non-empty strings", param="stop")
    req.stop = stop
    req.stream = _get(body, "stream", bool, False, what="true or false")
    options = _get(body, "stream_options", dict, {}, what="an object")
    req.include_usage = bool(options.get("include_usage", False))
    return req


def chat_request(body: dict, model_id: str) -> Request:
    _model(body, model_id)
    req = Request("chat", _messages(body))
    return _policy_fields(body, _generation_fields(body, req))


def completion_request(body: dict, model_id: str) -> Request:
    _model(body, model_id)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt must be one non-empty string", param="prompt")
    req = Request("completion", prompt)
    return _policy_fields(body, _generation_fields(body, req))


def compress_request(body: dict, model_id: str) -> Request:
    _model(body, model_id)
    if "messages" in body:
        req = Request("compress", _messages(body))
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("give messages, or a non-empty prompt string", param="prompt")
        req = Request("compress", prompt)
    req.marker = _get(body, "marker", str, " …", what="a string")
    return _policy_fields(body, req)


# ------------------------------------------------------------------ responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(result) -> dict:
    prompt, completion = int(result.stats.prompt_tokens), int(result.stats.generated_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def stats(result, queued_s: float) -> dict:
    """The project's figures for one answer (NaN as null)."""
    out = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(result.stats).items()}
    out["queued_s"] = queued_s
    return out


def chat_response(req: Request, result, model_id: str, queued_s: float) -> dict:
    message = {"role": "assistant", "content": result.text}
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": usage(result), "pyspec": stats(result, queued_s)}


def completion_response(req: Request, result, model_id: str, queued_s: float) -> dict:
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": usage(result), "pyspec": stats(result, queued_s)}


class Chunks:
    """The stream chunks of one answer, chat or completion."""

    def __init__(self, req: Request, model_id: str):
        self.req, self.model_id = req, model_id
        self.chat = req.kind == "chat"
        self.id = new_id("chatcmpl" if self.chat else "cmpl")
        self.created = int(time.time())

    def _chunk(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model_id, "choices": choices, **extra}

    def _choice(self, text: Optional[str], finish: Optional[str], role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def first(self) -> Optional[dict]:
        """The chat stream opens with the assistant's role."""
        return self._chunk([self._choice("", None, role=True)]) if self.chat else None

    def text(self, piece: str) -> dict:
        return self._chunk([self._choice(piece, None)])

    def last(self, result, queued_s: float) -> list:
        """The finishing chunk (with the project's figures), then the usage
        chunk if the client asked for it."""
        out = [self._chunk([self._choice(None if self.chat else "", result.finish_reason)],
                           pyspec=stats(result, queued_s))]
        if self.req.include_usage:
            out.append(self._chunk([], usage=usage(result)))
        return out


def compress_response(compressed, model_id: str, queued_s: float) -> dict:
    out = compressed.to_dict()
    body = {"id": new_id("cmpr"), "object": "compression", "created": int(time.time()), "model": model_id}
    body["messages" if "messages" in out else "prompt"] = out.get("messages", out.get("prompt"))
    body["usage"] = {k: out[k] for k in ("prompt_tokens", "kept_tokens", "compressed_tokens")}
    body["pyspec"] = {"method": out["method"], "times": out["times"], "queued_s": queued_s}
    return body
