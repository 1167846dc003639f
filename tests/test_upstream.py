"""`pyspec-gguf serve --upstream`: the front of another OpenAI-compatible
engine. llama-cpp-python's own server, serving SmolLM2, is the upstream,
started here behind a TCP relay that records its connections; the front
holds only the draft (SmolLM2 too); the official `openai` client is the
user. A long prompt reaches the upstream compressed, and its answer is the
upstream's answer to that compressed prompt; a short one passes unchanged;
every upstream failure becomes an OpenAI error; a client that leaves
closes the upstream request."""

import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from local_server import free_port, launch, start_server, stop_server

from pyspec_gguf import SpecSession
from pyspec_gguf.document import conversation, question_protect
from pyspec_gguf.server.jobs import last_paragraph


BUDGET = 128
FRONT = ["--budget", str(BUDGET), "--min-prompt-tokens", "200", "--flash-attn", "off"]
NEEDLE = "The secret code for the vault is 4471."


# ------------------------------------------------------------------ the engines

def start_llama_cpp_server(model_path) -> tuple:
    """llama-cpp-python's OpenAI-compatible server on SmolLM2; (process, base URL)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--port", str(port),
           "--host", "127.0.0.1", "--n_ctx", "2048", "--verbose", "false",
           # by default it cuts a streamed answer short when another request arrives
           "--interrupt_requests", "false"]
    return launch(cmd, url + "/v1/models", 120, "llama_cpp.server"), url


class Relay:
    """A TCP relay in front of a port that records each connection: when it
    opened and closed, and the bytes the client sent."""

    def __init__(self, port: int):
        self.port, self.connections, self._lock = port, [], threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            record = {"opened": time.time(), "closed": None, "sent": bytearray()}
            with self._lock:
                self.connections.append(record)
            for src, dst, sent in ((client, upstream, record["sent"]), (upstream, client, None)):
                threading.Thread(target=self._pump, args=(src, dst, sent, record, client, upstream),
                                 daemon=True).start()

    def _pump(self, src, dst, sent, record, *both) -> None:
        try:
            while data := src.recv(65536):
                if sent is not None:
                    sent.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in both:  # either side closing closes the connection
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        with self._lock:
            record["closed"] = record["closed"] or time.time()

    def carrying(self, marker: str) -> dict:
        with self._lock:
            found = [c for c in self.connections if marker.encode() in c["sent"]]
        assert found, f"no upstream connection carried {marker!r}"
        return found[-1]

    def close(self) -> None:
        self._server.close()


@pytest.fixture(scope="module")
def engine(small_path):
    proc, url = start_llama_cpp_server(small_path)
    relay = Relay(int(url.rsplit(":", 1)[1]))
    yield relay, url
    relay.close()
    proc.terminate()  # it may still be writing an answer whose client left: it does not stop those
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def front(small_path, engine):
    relay, _ = engine
    proc, url = start_server(["serve", "--draft", str(small_path), "--upstream", relay.url + "/v1", "--workers", "2",
                              "--cache-slots", "4",
                              *FRONT])
    yield url
    stop_server(proc)


def client_of(url: str, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


@pytest.fixture(scope="module")
def session(small_path):
    with SpecSession(draft=str(small_path), target=str(small_path), flash_attn="off", progress=False) as s:
        yield s


def long_messages(prose: str, question: str, variant: int = 0) -> list:
    sentences = prose.split(". ")[:16]
    middle = len(sentences) // 2
    doc = f"Report {variant}. {'. '.join(sentences[:middle])}. {NEEDLE} {'. '.join(sentences[middle:])}"
    return [{"role": "user", "content": f"{doc}\n\nQuestion: {question}"}]


def compressed_locally(session, messages: list) -> list:
    """What the front sends upstream: SpecPC at the budget, the question kept."""
    protect = min(question_protect(session.target, last_paragraph(messages)), BUDGET // 2)
    return session.compress(messages, BUDGET, "specpc", protect).messages


def chat(client, messages, stream=False, **extra):
    """(text, pyspec, usage) of one chat request."""
    if not stream:
        r = client.chat.completions.create(model="smol", messages=messages, max_tokens=16, temperature=0,
                                           extra_body=extra or None)
        return r.choices[0].message.content, (r.model_extra or {}).get("pyspec"), r.usage
    pieces, figures = [], None
    for chunk in client.chat.completions.create(model="smol", messages=messages, max_tokens=16, temperature=0,
                                                stream=True, extra_body=extra or None):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        figures = (chunk.model_extra or {}).get("pyspec") or figures
    return "".join(pieces), figures, None


# ------------------------------------------------------------------ answers

@pytest.mark.parametrize("stream", [False, True])
def test_a_long_prompt_reaches_the_upstream_compressed(front, engine, session, prose, stream):
    _, engine_url = engine
    messages = long_messages(prose, "What is the secret code for the vault?")
    text, figures, usage = chat(client_of(front), messages, stream)
    assert figures["compressed"] is True and figures["method"] == "specpc"
    assert figures["prompt_tokens"] > 2 * BUDGET and figures["kept_tokens"] <= BUDGET
    assert figures["times"]["draft_prefill"] > 0
    # the upstream's answer to the same compressed prompt, asked directly
    short = compressed_locally(session, messages)
    direct_text, _, direct_usage = chat(client_of(engine_url), short)
    assert text == direct_text and text
    if usage is not None:
        # the upstream's own count is the compressed prompt's: it saw as many
        # fewer tokens than the whole prompt as the draft cut (the engine's
        # template may add its own, e.g. a default system message)
        whole = chat(client_of(engine_url), messages)[2].prompt_tokens
        assert usage.prompt_tokens == direct_usage.prompt_tokens < whole
        cut = figures["prompt_tokens"] - figures["compressed_tokens"]
        assert abs((whole - usage.prompt_tokens) - cut) <= 8


def test_a_short_prompt_passes_unchanged(front, engine):
    _, engine_url = engine
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    text, figures, usage = chat(client_of(front), messages)
    direct_text, _, direct_usage = chat(client_of(engine_url), messages)
    assert figures["compressed"] is False
    assert (text, usage.prompt_tokens) == (direct_text, direct_usage.prompt_tokens)


def test_a_completion_prompt_is_compressed_as_text(front, prose):
    prompt = long_messages(prose, "What is the secret code?")[0]["content"] + "\nAnswer:"
    r = client_of(front).completions.create(model="smol", prompt=prompt, max_tokens=8, temperature=0)
    assert r.model_extra["pyspec"]["compressed"] is True
    assert r.usage.prompt_tokens <= BUDGET + 8 < r.model_extra["pyspec"]["prompt_tokens"]


def test_models_and_health_come_through(front, engine):
    assert client_of(front).models.list().data  # the upstream's list
    with urllib.request.urlopen(front + "/health", timeout=10) as r:
        assert json.loads(r.read())["upstream"] == engine[0].url + "/v1"


def test_a_client_that_leaves_closes_the_upstream_request(front, engine, session):
    relay, _ = engine
    client = client_of(front)
    # answers that run to max_tokens (their ends of turn forbidden): far longer than the client stays
    never_end = {str(t): -100 for t in range(session.target.n_vocab) if session.target.is_eog(t)}
    # streamed: the first piece read, then the client hangs up
    marker = "Count from 1 to 400, one number per line. (stream)"
    stream = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": marker}],
                                            max_tokens=600, temperature=0, stream=True, logit_bias=never_end)
    next(iter(stream))
    stream.close()
    _wait_closed(relay, marker, time.time())
    # not streamed: the client gives up while the upstream is still answering
    marker = "Count from 1 to 400, one number per line. (whole)"
    with pytest.raises(openai.APITimeoutError):
        client_of(front, timeout=1.5).chat.completions.create(
            model="smol", messages=[{"role": "user", "content": marker}], max_tokens=600, temperature=0,
            logit_bias=never_end)
    _wait_closed(relay, marker, time.time())


def _wait_closed(relay, marker: str, since: float, within: float = 5.0) -> None:
    deadline = since + within
    while time.time() < deadline:
        connection = relay.carrying(marker)
        if connection["closed"]:
            return
        time.sleep(0.05)
    raise AssertionError(f"the upstream request was still open {within} s after its client left")


# ------------------------------------------------------------------ restarts

def test_a_restarted_front_reads_only_the_new_turn(small_path, engine, session, prose, tmp_path):
    """The draft's state is saved as a request ends; a front started again
    on the same folder loads it, and the conversation's next turn costs the
    draft only its new tokens. A document's saved state is found alike."""
    relay, _ = engine
    args = ["serve", "--draft", str(small_path), "--upstream", relay.url + "/v1", "--cache-dir", str(tmp_path),
            *FRONT]
    messages = long_messages(prose, "What is the secret code for the vault?", variant=7)
    proc, url = start_server(args)
    try:
        answer, first, _ = chat(client_of(url), messages)
    finally:
        stop_server(proc)
    assert first["draft_cached"] == 0 and list(tmp_path.glob("*.psgdoc"))
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And who keeps it?"}]
    proc, url = start_server(args)
    try:
        _, second, _ = chat(client_of(url), messages)
    finally:
        stop_server(proc)
    assert second["draft_cached"] >= first["prompt_tokens"] - 32


def test_a_front_finds_a_documents_saved_state(small_path, engine, session, prose, tmp_path):
    relay, _ = engine
    text = " ".join(prose.split(". ")[:20]) + f" {NEEDLE}"
    with session.document(text, cache=False) as doc:
        doc.save(tmp_path / "doc.psgdoc")
        prefix = len(doc.prefix)
    messages = conversation(text, [], "What is the secret code?")
    proc, url = start_server(["serve", "--draft", str(small_path), "--upstream", relay.url + "/v1", "--cache-dir",
                              str(tmp_path), *FRONT])
    try:
        _, figures, _ = chat(client_of(url), messages)
    finally:
        stop_server(proc)
    # the draft read only what followed the document (and the window it reads again for its scores)
    assert figures["compressed"] and figures["draft_cached"] >= prefix - 80


# ------------------------------------------------------------------ failures

class Stub(BaseHTTPRequestHandler):
    """An upstream that fails in the way the last message names."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._send(200, "application/json", json.dumps({"object": "list", "data": [{"id": "stub"}]}))

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = body["messages"][-1]["content"]
        if mode == "refuse":
            self._send(400, "application/json", json.dumps({"error": {"message": "no such option",
                                                                      "type": "invalid_request_error"}}))
        elif mode == "fail":
            self._send(500, "text/plain", "boom")
        elif mode == "busy":
            self._send(503, "application/json", json.dumps({"error": {"message": "too many requests"}}))
        elif mode == "not json":
            self._send(200, "text/html", "<html>hello</html>")
        elif mode == "hang":
            time.sleep(4)
            self._send(200, "application/json", "{}")
        elif mode == "cut":  # one chunk, then the connection drops
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            chunk = {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            self.close_connection = True

    def _send(self, status: int, kind: str, text: str):
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client the front gave up on (the "hang" mode): expected


@pytest.fixture(scope="module")
def stub_front(small_path):
    stub = QuietServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    proc, url = start_server(["serve", "--draft", str(small_path), "--upstream",
                              f"http://127.0.0.1:{stub.server_address[1]}/v1", "--upstream-timeout", "1", *FRONT])
    yield url
    stop_server(proc)
    stub.shutdown()


@pytest.mark.parametrize("mode, error, status, code", [
    ("refuse", openai.BadRequestError, 400, "upstream_refused"),
    ("fail", openai.InternalServerError, 502, "upstream_error"),
    ("busy", openai.InternalServerError, 503, "upstream_error"),
    ("not json", openai.InternalServerError, 502, "upstream_bad_response"),
    ("hang", openai.InternalServerError, 504, "upstream_timeout"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_failures_are_openai_errors(stub_front, mode, error, status, code, stream):
    with pytest.raises(error) as e:
        r = client_of(stub_front).chat.completions.create(model="stub", messages=[{"role": "user", "content": mode}],
                                                          stream=stream)
        if stream:
            list(r)
    assert e.value.status_code == status
    assert e.value.body["code"] == code and e.value.body["message"]
    if mode == "refuse":
        assert "no such option" in e.value.body["message"]


def test_a_stream_cut_by_the_upstream_ends_with_an_error_event(stub_front):
    events = []
    req = urllib.request.Request(stub_front + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"messages": [{"role": "user", "content": "cut"}],
                                                  "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=30) as r:
        for line in r:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "Hel"
    assert json.loads(events[-1])["error"]["code"] == "upstream_failed"
    assert b"[DONE]" not in events


def test_an_unreachable_upstream_is_a_502(small_path):
    proc, url = start_server(["serve", "--draft", str(small_path), "--upstream",
                              f"http://127.0.0.1:{free_port()}/v1", *FRONT])
    try:
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as e:
                r = client_of(url).chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                                           stream=stream)
                if stream:
                    list(r)
            assert e.value.status_code == 502 and e.value.body["code"] == "upstream_unreachable"
    finally:
        stop_server(proc)


def test_a_bad_upstream_option_is_refused_at_start(small_path):
    r = subprocess.run([sys.executable, "-m", "pyspec_gguf", "serve", "--draft", str(small_path), "--upstream",
                        "127.0.0.1:8080"], capture_output=True, text=True, timeout=120,
                       cwd=tempfile.gettempdir())  # the installed package, not the source tree
    assert r.returncode != 0 and "http://" in r.stderr


# ------------------------------------------------------------------ load

@pytest.mark.slow
def test_load_16_clients_4_requests_each(front, engine, session, prose):
    """Every answer through the front is the upstream's own answer to the
    same compressed prompt; none is lost. The engine answers a prompt it
    has just seen from its cached prefix, re-reading only the last token,
    and that batch can decide a near-tie of this 135M model the other way:
    so each prompt is asked twice, after another prompt and again, and an
    answer through the front must be one of the two."""
    _, engine_url = engine
    prompts = [long_messages(prose, "What is the secret code for the vault?", v) for v in range(4)]
    direct = client_of(engine_url)
    shorts = [compressed_locally(session, messages) for messages in prompts]
    expected = [{chat(direct, short)[0], chat(direct, short)[0]} for short in shorts]
    client = client_of(front, timeout=600)

    def one(i: int) -> tuple:
        v = i % 4
        return v, chat(client, prompts[v], stream=i % 2 == 1)[0]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(64)))
    assert len(answers) == 64
    wrong = [(v, text, expected[v]) for v, text in answers if text not in expected[v]]
    assert not wrong, f"{len(wrong)} of 64 answers differ, e.g. {wrong[:3]}"
