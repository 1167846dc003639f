"""The HTTP endpoints: OpenAI's chat completions, completions and models,
the project's compress, and health.

A handler checks the request (a 4xx before anything is queued), submits a
job to the worker pool (503 with Retry-After when the queue is full), waits
for the job to be checked by its worker (its errors are still a 4xx), then
answers at once or streams server-sent events. A client that goes away
cancels its job.

In front of an upstream engine (`upstream`), the worker's job is the
prompt the upstream gets (compressed, or unchanged where short); the
answer is the upstream's, passed through as it comes, with `pyspec` added.
A client that goes away closes its upstream request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from typing import Callable, Optional

import anyio
from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from ..session import Cancelled
from . import jobs, protocol
from .protocol import RequestError, error_from
from .upstream import Upstream
from .workers import Job, QueueFull, WorkerPool

RETRY_AFTER_S = 5
# how long a stream has, once the server begins to stop, to send its error event
# (less than the 5 s uvicorn waits for connections to close)
SHUTDOWN_GRACE_S = 2


def create_app(pool: WorkerPool, policy: jobs.Policy, model_id: str, api_key: Optional[str] = None,
               upstream: Optional[Upstream] = None) -> FastAPI:
    """The server's app over a started worker pool; the pool is closed when
    the app shuts down. With `upstream`, answers come from that engine
    (the pool's session only compresses) and `model_id` is only a name."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.close(timeout=5)
        if upstream is not None:
            await upstream.close()

    async def check_key(request: HttpRequest):
        # a dependency, not an HTTP middleware: Starlette's middleware wraps
        # the request's receive channel, and a handler behind it never sees
        # its client disconnect (a non-streamed answer would run to its end)
        if api_key is not None and not key_matches(request.headers.get("authorization", ""), api_key):
            raise RequestError("a valid API key is needed (Authorization: Bearer ...)", status=401,
                               code="invalid_api_key")

    app = FastAPI(title="pyspec-gguf", docs_url=None, redoc_url=None, lifespan=lifespan,
                  dependencies=[Depends(check_key)])
    app.state.pool, app.state.policy, app.state.model_id = pool, policy, model_id

    @app.exception_handler(RequestError)
    async def _refused(request, e: RequestError):
        return _error(e)

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):  # unknown paths and methods, in OpenAI's shape
        return _error(RequestError(str(e.detail), status=e.status_code))

    @app.get("/health")
    async def health():
        c = pool.counts
        return {"status": "ok", "workers": len(pool.workers), "running": c.running, "waiting": pool.waiting,
                "served": c.served, "failed": c.failed, "cancelled": c.cancelled, "rejected": c.rejected,
                **({"upstream": upstream.url} if upstream is not None else {})}

    @app.get("/v1/models")
    async def models():
        if upstream is not None:
            return await upstream.get("/models")
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": int(time.time()),
                                            "owned_by": "pyspec-gguf"}]}

    # the model a request names is the upstream's to check
    own_model = model_id if upstream is None else None

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        body = await _body(request)
        req = protocol.chat_request(body, own_model)
        if upstream is not None:
            return await _forward(request, body, req, "/chat/completions")
        return await _generate(request, req, protocol.chat_response)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await _body(request)
        req = protocol.completion_request(body, own_model)
        if upstream is not None:
            return await _forward(request, body, req, "/completions")
        return await _generate(request, req, protocol.completion_response)

    @app.post("/v1/compress")
    async def compress(request: HttpRequest):
        req = protocol.compress_request(await _body(request), model_id)
        job = _submit(jobs.compress(req, policy))
        _, compressed = await _wait(request, job)
        return protocol.compress_response(compressed, model_id, job.queued_s)

    async def _generate(request: HttpRequest, req: protocol.Request, respond: Callable):
        job = _submit(jobs.answer(req, policy))
        await _wait(request, job, until=("ready",))  # checked by its worker: its errors are still a 4xx
        if req.stream:
            shutdown = anyio.Event()  # set by sse-starlette when the server begins to stop
            return EventSourceResponse(_events(job, req, shutdown), ping=10, shutdown_event=shutdown,
                                       shutdown_grace_period=SHUTDOWN_GRACE_S)
        _, result = await _wait(request, job)
        return respond(req, result, model_id, job.queued_s)

    async def _events(job: Job, req: protocol.Request, shutdown: anyio.Event):
        chunks = protocol.Chunks(req, model_id)
        try:
            first = chunks.first()
            if first is not None:
                yield _sse(first)
            while True:
                if shutdown.is_set():  # an error event, so that the client does not take the cut for an end
                    yield _sse(RequestError("the server is shutting down; the answer was cut short", status=503,
                                            code="server_shutdown", kind="server_error").body())
                    return
                try:
                    kind, value = await asyncio.wait_for(job.next(), timeout=0.25)
                except asyncio.TimeoutError:
                    continue
                if kind == "text":
                    yield _sse(chunks.text(value))
                elif kind == "done":
                    for chunk in chunks.last(value, job.queued_s):
                        yield _sse(chunk)
                    yield {"data": "[DONE]"}
                    return
                else:  # failed after the stream began: an error event ends it
                    yield _sse(error_from(value).body())
                    return
        finally:
            job.cancel()  # a no-op once done; else the client went away

    async def _forward(request: HttpRequest, body: dict, req: protocol.Request, path: str):
        job = _submit(jobs.forward(req, policy))
        _, forwarded = await _wait(request, job)
        figures = {**forwarded.figures, "queued_s": job.queued_s}
        sent = upstream.body(body, forwarded.prompt)
        if req.stream:
            response = await _unless_gone(request, upstream.open_stream(path, sent))
            shutdown = anyio.Event()
            return EventSourceResponse(_relay(response, figures, shutdown), ping=10, shutdown_event=shutdown,
                                       shutdown_grace_period=SHUTDOWN_GRACE_S)
        answer = await _unless_gone(request, upstream.post(path, sent))
        answer["pyspec"] = figures
        return answer

    async def _relay(response, figures: dict, shutdown: anyio.Event):
        """The upstream's stream, chunk by chunk, `pyspec` on the chunk
        that finishes the answer; closing it (the client went away, the
        server stops) closes the upstream request."""
        told = False
        try:
            async for chunk in upstream.events(response):
                if shutdown.is_set():
                    yield _sse(RequestError("the server is shutting down; the answer was cut short", status=503,
                                            code="server_shutdown", kind="server_error").body())
                    return
                if not told and any(isinstance(c, dict) and c.get("finish_reason")
                                    for c in chunk.get("choices") or []):
                    chunk["pyspec"], told = figures, True
                yield _sse(chunk)
            yield {"data": "[DONE]"}
        except RequestError as e:  # failed after the stream began: an error event ends it
            yield _sse(e.body())
        finally:
            await response.aclose()

    def _submit(work) -> Job:
        try:
            return pool.submit(Job(work, asyncio.get_running_loop()))
        except QueueFull as e:
            raise RequestError(str(e), status=503, code="server_busy", kind="server_error") from None

    return app


def key_matches(authorization: str, api_key: str) -> bool:
    """An Authorization header that carries `api_key` as a Bearer token (the
    scheme's case does not matter: RFC 7235)."""
    scheme, _, token = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())


async def _body(request: HttpRequest) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body


async def _wait(request: HttpRequest, job: Job, until=("done",)) -> tuple:
    """The job's next event of a kind in `until`; its error raised as a
    RequestError; the job cancelled if the client goes away meanwhile."""
    while True:
        try:
            kind, value = await asyncio.wait_for(job.next(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise RequestError("the client went away", status=499) from None
            continue
        except asyncio.CancelledError:
            job.cancel()
            raise
        if kind == "error":
            if isinstance(value, Cancelled):
                raise RequestError("the request was cancelled", status=499)
            raise error_from(value)
        if kind in until:
            return kind, value


async def _unless_gone(request: HttpRequest, awaitable):
    """The awaitable's result, cancelled (and so its upstream request
    closed) if the client goes away first."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise RequestError("the client went away", status=499)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _sse(payload: dict) -> dict:
    return {"data": json.dumps(payload, ensure_ascii=False)}


def _error(e: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)
