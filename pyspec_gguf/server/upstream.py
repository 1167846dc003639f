"""The engine behind `serve --upstream URL`: any OpenAI-compatible server
(llama-server, Ollama, vLLM, llama-cpp-python's, a hosted API) answers;
this server forwards each request to it, with a long prompt first cut by
the local draft to what SpecPC keeps.

Every way the upstream can fail becomes an OpenAI error body with a status
that says whose fault it was: 502 where it could not be reached, broke the
connection or answered what is not OpenAI's format, 504 where it took
longer than the timeout, its own status and message for a 4xx, 502 for a
5xx (503, busy, stays 503).
"""

from __future__ import annotations

import json
from typing import AsyncIterator, Optional

import httpx2

from .protocol import RequestError

# the project's own request fields: this server reads them, the upstream never sees them
OWN_FIELDS = ("method", "budget", "method_options", "protect_last", "speculative", "marker")
CONNECT_TIMEOUT_S = 10.0


class Upstream:
    """The upstream engine at `url`, its OpenAI base URL as the `openai`
    client takes it (e.g. http://127.0.0.1:8080/v1 for llama-server,
    http://127.0.0.1:11434/v1 for Ollama). `model`: the model name sent
    upstream (None: the client's); `timeout`: seconds the upstream may take
    to send the next piece of an answer."""

    def __init__(self, url: str, api_key: Optional[str] = None, model: Optional[str] = None,
                 timeout: float = 600.0):
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the upstream must be an http:// or https:// URL, not {url!r}")
        if timeout <= 0:
            raise ValueError(f"the upstream timeout must be > 0 seconds, not {timeout}")
        self.url, self.model = url, model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx2.AsyncClient(base_url=url, headers=headers, trust_env=False,
                                         timeout=httpx2.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S)))

    async def close(self) -> None:
        await self.client.aclose()

    def body(self, body: dict, prompt) -> dict:
        """The body sent upstream: the client's, less the project's fields,
        with `prompt` (messages or text) in place of the client's."""
        out = {k: v for k, v in body.items() if k not in OWN_FIELDS}
        out["messages" if isinstance(prompt, list) else "prompt"] = prompt
        if self.model is not None:
            out["model"] = self.model
        return out

    async def get(self, path: str) -> dict:
        return await self._json(lambda: self.client.get(path))

    async def post(self, path: str, body: dict) -> dict:
        """The upstream's answer to a request that is not streamed."""
        return await self._json(lambda: self.client.post(path, json=body))

    async def open_stream(self, path: str, body: dict) -> httpx2.Response:
        """A streamed request, its response open once the upstream accepted
        it (its failures raised here, before the client's stream begins);
        the caller closes it (`aclose`)."""
        request = self.client.build_request("POST", path, json=body)
        response = await self._send(lambda: self.client.send(request, stream=True))
        if response.status_code >= 400 or "text/event-stream" not in response.headers.get("content-type", ""):
            try:
                await self._send(response.aread)
            finally:
                await response.aclose()
            if response.status_code < 400:
                raise self._malformed("an answer that is not a stream of server-sent events")
            raise self._refused(response)
        return response

    async def events(self, response: httpx2.Response) -> AsyncIterator[dict]:
        """The chunks of an open stream, up to its [DONE]; a failure midway,
        a stream cut before its [DONE] included, raised as a RequestError."""
        try:
            async for event in httpx2.EventSource(response):
                if event.data.strip() == "[DONE]":
                    return
                if not event.data.strip():
                    continue
                try:
                    chunk = json.loads(event.data)
                except ValueError:
                    raise self._malformed(f"a stream event that is not JSON: {event.data[:200]!r}") from None
                if isinstance(chunk, dict) and "error" in chunk:
                    raise RequestError(f"the upstream failed midway: {_message(chunk)}", status=502,
                                       code="upstream_error", kind="server_error")
                yield chunk
        except httpx2.HTTPError as e:
            raise self._transport(e) from None
        raise RequestError(f"the upstream at {self.url} ended its stream before [DONE]", status=502,
                           code="upstream_failed", kind="server_error")

    async def _json(self, send) -> dict:
        response = await self._send(send)
        if response.status_code >= 400:
            raise self._refused(response)
        try:
            body = response.json()
        except ValueError:
            raise self._malformed(f"a body that is not JSON: {response.text[:200]!r}") from None
        if not isinstance(body, dict):
            raise self._malformed(f"a body that is not a JSON object: {response.text[:200]!r}")
        return body

    async def _send(self, send):
        try:
            return await send()
        except httpx2.HTTPError as e:
            raise self._transport(e) from None

    def _transport(self, e: Exception) -> RequestError:
        if isinstance(e, (httpx2.ConnectError, httpx2.ConnectTimeout)):
            return RequestError(f"the upstream at {self.url} could not be reached ({e or type(e).__name__})",
                                status=502, code="upstream_unreachable", kind="server_error")
        if isinstance(e, httpx2.TimeoutException):
            return RequestError(f"the upstream at {self.url} did not answer in time ({type(e).__name__})",
                                status=504, code="upstream_timeout", kind="server_error")
        return RequestError(f"the upstream at {self.url} failed: {type(e).__name__}: {e}", status=502,
                            code="upstream_failed", kind="server_error")

    def _malformed(self, what: str) -> RequestError:
        return RequestError(f"the upstream at {self.url} sent {what}", status=502, code="upstream_bad_response",
                            kind="server_error")

    def _refused(self, response: httpx2.Response) -> RequestError:
        """An upstream's error answer: a 4xx is the request's fault and keeps
        its status; a 5xx is a bad gateway, but for 503 (busy: retry)."""
        status = response.status_code
        try:
            message = _message(response.json())
        except ValueError:
            message = response.text[:500] or response.reason_phrase
        if status < 500:
            return RequestError(f"the upstream refused the request ({status}): {message}", status=status,
                                code="upstream_refused")
        return RequestError(f"the upstream failed ({status}): {message}", status=503 if status == 503 else 502,
                            code="upstream_error", kind="server_error")


def _message(body) -> str:
    """The message of an error body, OpenAI's shape or another."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str):
        return error
    if isinstance(body, dict) and body.get("detail"):
        return str(body["detail"])
    return json.dumps(body)[:500]
