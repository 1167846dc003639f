"""The OpenAI-compatible server, through the official `openai` client
against `pyspec-gguf serve` on 127.0.0.1 (SmolLM2 as draft and target):
answers equal `SpecSession.generate`'s, a conversation's second request
reuses the draft's prefix, a client that leaves cancels its answer, bad
requests get 4xx error bodies, a full queue 503, and 16 clients x 4
requests are all answered, each as it is when asked alone."""

import json
import os
import signal
import statistics
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from local_server import start_server, stop_server

from pyspec_gguf import SpecSession
from pyspec_gguf.bench.common import append_result


NEEDLE = "The secret code for the vault is 4471."
MAX_TOKENS = 12
BUDGET = 0.5
POLICY = ["--method", "specpc", "--budget", str(BUDGET), "--min-prompt-tokens", "200"]


def serve_small(model: str, *args: str):
    return start_server(["serve", "--draft", model, "--target", model, "--max-tokens", str(MAX_TOKENS), *args])


def health(url: str, key: str = None, scheme: str = "Bearer") -> dict:
    req = urllib.request.Request(url + "/health", headers={"Authorization": f"{scheme} {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def raw_post(url: str, path: str, body: bytes, headers=None):
    """(status, headers, JSON body) of a POST, errors included."""
    req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


# Flash attention off in the server and in the session its answers are held
# to: a request served from a cached prefix equals one asked alone to the
# last bit only without it (tests/test_document.py bounds the difference
# with the default on)
EXACT = ["--flash-attn", "off"]


@pytest.fixture(scope="module")
def server(small_path):
    proc, url = serve_small(str(small_path), *POLICY, *EXACT, "--workers", "2", "--cache-slots", "4")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def session(small_path):
    with SpecSession(draft=str(small_path), target=str(small_path), flash_attn="off", progress=False) as s:
        yield s


@pytest.fixture(scope="module")
def model_id(client):
    (model,) = client.models.list().data
    return model.id


def document(prose: str, variant: int = 0) -> str:
    """About 330 tokens: two thirds of the prose with a fact between its
    halves (a different opening per variant, so prompts differ from their
    start)."""
    sentences = prose.split(". ")[:16]
    middle = len(sentences) // 2
    return f"Report {variant}. {'. '.join(sentences[:middle])}. {NEEDLE} {'. '.join(sentences[middle:])}"


def ask(prose: str, question: str, variant: int = 0) -> list:
    return [{"role": "user", "content": f"{document(prose, variant)}\n\nQuestion: {question}"}]


def chat(client, model_id, messages, stream=False, **extra):
    """(text, the pyspec stats, finish reason, usage) of one chat request."""
    if not stream:
        r = client.chat.completions.create(model=model_id, messages=messages, extra_body=extra or None)
        return r.choices[0].message.content, r.model_extra["pyspec"], r.choices[0].finish_reason, r.usage
    pieces, stats, finish, usage = [], None, None, None
    for chunk in client.chat.completions.create(model=model_id, messages=messages, stream=True,
                                                stream_options={"include_usage": True}, extra_body=extra or None):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
            stats = (chunk.model_extra or {}).get("pyspec") or stats
        if chunk.usage:
            usage = chunk.usage
    return "".join(pieces), stats, finish, usage


# ------------------------------------------------------------------ answers

@pytest.mark.parametrize("method", ["specpc", "speckv", "full"])
@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_generate(client, model_id, session, prose, method, stream):
    messages = ask(prose, "What is the secret code for the vault?")
    text, stats, finish, usage = chat(client, model_id, messages, stream, method=method, budget=BUDGET)
    expected = session.generate(messages, method=method, budget=BUDGET, max_tokens=MAX_TOKENS)
    assert text == expected.text and text
    assert stats["method"] == method
    assert stats["kept_tokens"] == expected.stats.kept_tokens
    assert usage.prompt_tokens == len(expected.prompt_tokens)
    assert usage.completion_tokens == expected.stats.generated_tokens
    assert finish == expected.finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_may_speculate(client, model_id, session, prose, stream):
    messages = ask(prose, "Tell the story of the fox, word for word.")
    text, stats, _, _ = chat(client, model_id, messages, stream, method="specpc", budget=BUDGET, speculative="draft")
    # the draft's proposals and batches depend on nothing but the tokens: the same answer as generate's
    expected = session.generate(messages, method="specpc", budget=BUDGET, max_tokens=MAX_TOKENS, speculative="draft")
    assert text == expected.text
    assert stats["speculative"] == "draft" and 0 < stats["drafted"] and stats["accepted"] <= stats["drafted"]
    assert stats["drafted"] == expected.stats.drafted and stats["draft_kv_bytes"] > 0


def test_completions_equal_generate(client, model_id, session, prose):
    prompt = document(prose, 7) + "\nThe secret code is"
    expected = session.generate(prompt, method="specpc", budget=BUDGET, max_tokens=MAX_TOKENS)
    r = client.completions.create(model=model_id, prompt=prompt, extra_body={"budget": BUDGET})
    assert r.choices[0].text == expected.text
    assert r.model_extra["pyspec"]["method"] == "specpc"  # the policy: a long prompt
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model_id, prompt=prompt, stream=True, extra_body={"budget": BUDGET}) if c.choices)
    assert streamed == expected.text


def test_policy_sends_short_prompts_through_full(client, model_id, prose):
    _, stats, _, _ = chat(client, model_id, [{"role": "user", "content": "Name a colour."}])
    assert stats["method"] == "full"
    _, stats, _, _ = chat(client, model_id, ask(prose, "Who kept the ledger?"))
    assert stats["method"] == "specpc" and stats["prompt_tokens"] >= 200


def test_second_request_reuses_the_draft_prefix(client, model_id, session, prose):
    first = ask(prose, "What is the secret code for the vault?", variant=3)
    answer, stats1, _, _ = chat(client, model_id, first, method="specpc", budget=BUDGET)
    assert stats1["draft_cached"] < stats1["prompt_tokens"] // 2  # a new document
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Who kept the ledger?"}]
    text, stats2, _, _ = chat(client, model_id, second, method="specpc", budget=BUDGET)
    # the draft prefilled only what followed the first prompt (and its recomputed window)
    assert stats2["draft_cached"] >= stats1["prompt_tokens"] - 80
    assert text == session.generate(second, method="specpc", budget=BUDGET, max_tokens=MAX_TOKENS).text


def test_stop_strings_and_seeded_sampling(client, model_id, prose):
    messages = ask(prose, "Describe the mill.")
    full, _, _, _ = chat(client, model_id, messages, method="full")
    words = full.split()
    assert len(words) >= 4, full
    stop = " " + words[2]
    cut = full[: full.index(stop)]
    for stream in (False, True):
        r = client.chat.completions.create(model=model_id, messages=messages, stop=[stop], stream=stream,
                                           extra_body={"method": "full"})
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert (text, finish) == (cut, "stop")
    sampled = [chat(client, model_id, messages, method="full", temperature=1.0, seed=s)[0] for s in (11, 11)]
    assert sampled[0] == sampled[1]


# ------------------------------------------------------------------ compress

def test_compress_endpoint_equals_session(server, model_id, session, prose):
    question = "What is the secret code for the vault?"
    messages = ask(prose, question)
    body = {"model": model_id, "messages": messages, "budget": 100, "protect_last": 16}
    status, _, body = raw_post(server, "/v1/compress", json.dumps(body).encode())
    assert status == 200, body
    expected = session.compress(messages, budget=100, protect_last=16)
    assert body["messages"] == expected.messages
    assert body["usage"]["kept_tokens"] == expected.kept_tokens == 100
    content, original = body["messages"][0]["content"], messages[0]["content"]
    assert content.endswith(question) and len(content) < len(original) / 3
    runs = [r for r in content.split(" …") if r]
    assert len(runs) > 1 and all(r in original for r in runs)  # kept text, in order, marked where cut
    status, _, body = raw_post(server, "/v1/compress", json.dumps({"messages": messages, "method": "speckv"}).encode())
    assert status == 400 and "prompt method" in body["error"]["message"]


# ------------------------------------------------------------------ faults

def test_bad_requests_get_openai_errors(client, server, model_id):
    good = [{"role": "user", "content": "Hello."}]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=good)
    bad_bodies = {
        "budget": {"budget": -3}, "fraction": {"budget": 1.5}, "method": {"method": "nope"},
        "option": {"method": "specpc", "method_options": {"window": "wide"}},
        "orphan option": {"method_options": {"window": 8}},
        "speculative": {"speculative": "fast"},
    }
    for what, extra in bad_bodies.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model_id, messages=good, extra_body=extra)
        assert e.value.status_code == 400, what
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, messages=good, n=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, messages=[])
    with pytest.raises(openai.BadRequestError) as e:  # longer than SmolLM2's 8,192 trained tokens
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "mill " * 9000}])
    assert e.value.code == "context_length_exceeded"
    for body in (b"{not json", b"[1, 2]", json.dumps({"model": model_id}).encode(),
                 json.dumps({"messages": good, "max_tokens": 0}).encode(),
                 json.dumps({"messages": good, "temperature": "hot"}).encode(),
                 json.dumps({"messages": good, "stop": [""]}).encode()):
        status, _, err = raw_post(server, "/v1/chat/completions", body)
        assert status == 400 and err["error"]["message"], body
    status, _, err = raw_post(server, "/v1/nowhere", b"{}")
    assert status == 404 and "error" in err
    # the workers live on
    assert health(server)["status"] == "ok"
    assert chat(client, model_id, good, method="full")[0]


def test_cancel_mid_stream_frees_the_worker(client, server, model_id, prose):
    before = health(server)
    stream = client.completions.create(model=model_id, prompt=prose, max_tokens=4000, stream=True,
                                       extra_body={"method": "full"})
    got = 0
    for chunk in stream:
        got += 1
        if got == 3:
            break
    stream.close()
    now = wait_until_cancelled(server, before)
    assert now["served"] == before["served"]  # it did not run to its 4,000 tokens
    assert chat(client, model_id, [{"role": "user", "content": "Hello."}], method="full")[0]


def test_a_non_streamed_request_is_cancelled_when_its_client_leaves(server, model_id):
    """The client gives up after a second, in the prefill of a long prompt:
    the worker is free again within a prefill chunk, the answer not run."""
    before = health(server)
    body = json.dumps({"messages": [{"role": "user", "content": "Tell a long story about the mill. " * 700}],
                       "max_tokens": 2000, "temperature": 1.0, "method": "full"}).encode()
    req = urllib.request.Request(server + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        urllib.request.urlopen(req, timeout=1.0)
    left = time.time()
    now = wait_until_cancelled(server, before)
    # checked at each 512-token chunk of the prefill: 1-4 s of SmolLM2 on a 2-core CPU, loaded or not; the
    # whole prefill would take ten times as long
    assert time.time() - left < 5.0, f"cancelled {time.time() - left:.1f} s after the client left"
    assert now["served"] == before["served"]


def wait_until_cancelled(server: str, before: dict, timeout: float = 30) -> dict:
    """/health once the server counts one more cancelled request and runs none."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = health(server)
        if now["cancelled"] > before["cancelled"] and now["running"] == 0:
            return now
        time.sleep(0.1)
    raise AssertionError(f"the request was not cancelled: {now}")


def test_max_tokens_fit_the_context(client, server, model_id, session):
    """An unset max_tokens is cut to the room the prompt leaves; an explicit
    one that does not fit is named in the error."""
    limit = session.target.context_limit
    words = limit - 40
    while True:  # a prompt that leaves room for fewer answer tokens than the server's default
        messages = [{"role": "user", "content": "mill " * words}]
        room = limit - len(session.tokenize(messages))
        if room < MAX_TOKENS:
            break
        words += room - MAX_TOKENS // 2
    assert room >= 1
    cheap = {"method": "headtail", "budget": 64}  # the target prefills 64 tokens, not 8K
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=messages, max_tokens=room + 1, extra_body=cheap)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    assert f"max_tokens {room + 1:,} does not fit" in str(e.value) and f"room for {room:,}" in str(e.value)
    r = client.chat.completions.create(model=model_id, messages=messages, extra_body=cheap)
    assert 1 <= r.usage.completion_tokens <= room


def test_a_nul_in_a_message_is_a_400(client, model_id):
    with pytest.raises(openai.BadRequestError, match="NUL"):
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "a\0b"}])


def test_a_stream_cut_by_shutdown_ends_with_an_error_event(small_path, prose):
    proc, url = serve_small(str(small_path), "--cache-slots", "0")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        stream = client.chat.completions.create(
            model=client.models.list().data[0].id, stream=True, max_tokens=4000, temperature=1.0,
            messages=[{"role": "user", "content": "Tell a long story about the mill."}], extra_body={"method": "full"})
        pieces = []
        with pytest.raises(openai.APIError, match="shutting down"):
            for chunk in stream:
                pieces.append(chunk)
                if len(pieces) == 3:
                    proc.send_signal(signal.SIGINT)
        assert len(pieces) >= 3
        assert proc.wait(timeout=20) is not None
    finally:
        if proc.poll() is None:
            stop_server(proc)


def test_full_queue_answers_503_and_api_key(small_path, prose):
    proc, url = serve_small(str(small_path), "--queue-size", "1", "--api-key", "s3cret", "--cache-slots", "0")
    try:
        status, _, body = raw_post(url, "/v1/completions", json.dumps({"prompt": "Hi"}).encode())
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        for scheme in ("bearer", "BEARER"):  # the scheme's case does not matter (RFC 7235)
            assert health(url, "s3cret", scheme)["status"] == "ok"
        for wrong in ({"Authorization": "Bearer s3cre"}, {"Authorization": "Basic s3cret"}):
            status, _, body = raw_post(url, "/v1/completions", json.dumps({"prompt": "Hi"}).encode(), wrong)
            assert status == 401
        key = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
        long = json.dumps({"prompt": prose, "max_tokens": 4000, "stream": True, "method": "full"}).encode()
        # the stream's headers come once its worker runs it
        running = urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", long, key), timeout=60)
        waiting = threading.Thread(target=_drain, args=(urllib.request.Request(url + "/v1/completions", long, key),),
                                   daemon=True)
        waiting.start()
        deadline = time.time() + 20
        while health(url, "s3cret")["waiting"] < 1:
            assert time.time() < deadline, "the second request never queued"
            time.sleep(0.1)
        status, headers, body = raw_post(url, "/v1/completions", json.dumps({"prompt": "Hi"}).encode(), key)
        assert status == 503 and int(headers["Retry-After"]) > 0 and body["error"]["code"] == "server_busy"
        assert health(url, "s3cret")["rejected"] == 1
        running.close()
    finally:
        stop_server(proc)


def _drain(req) -> None:
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
    except Exception:
        pass


# ------------------------------------------------------------------ load

@pytest.mark.slow
def test_load_16_clients_4_requests_each(client, server, model_id, prose):
    """Every response complete and equal to its answer asked alone; none
    lost or duplicated; the server healthy after; bounded in time."""
    methods = ["specpc", "speckv", "full", None]  # None: the server's policy
    cases = [(ask(prose, q, v), m) for v, q in enumerate(["What is the secret code?", "Who kept the ledger?"])
             for m in methods]
    serial = {}
    for i, (messages, method) in enumerate(cases):
        serial[i] = chat(client, model_id, messages, **({"method": method} if method else {}))[0]
    before = health(server)
    deadline = time.time() + 600

    def client_run(c: int):
        out = []
        for r in range(4):
            assert time.time() < deadline, "the load test ran past its 10 minutes"
            i = (c * 4 + r) % len(cases)
            messages, method = cases[i]
            t0 = time.perf_counter()
            text, stats, finish, usage = chat(client, model_id, messages, stream=(c + r) % 2 == 1,
                                              **({"method": method} if method else {}))
            out.append((i, text, finish, time.perf_counter() - t0, stats))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as ex:
        results = [r for rs in ex.map(client_run, range(16)) for r in rs]
    wall = time.perf_counter() - t0
    after = health(server)
    assert len(results) == 64
    wrong = [(i, text, serial[i]) for i, text, *_ in results if text != serial[i]]
    assert not wrong, wrong[:3]
    assert all(finish in ("stop", "length") for _, _, finish, _, _ in results)
    assert after["served"] - before["served"] == 64 and after["failed"] == before["failed"]
    assert after["rejected"] == before["rejected"] and after["running"] == 0 and after["waiting"] == 0
    lat = sorted(t for *_, t, _ in results)
    figures = {"requests": 64, "failures": len(wrong), "queue_full": after["rejected"] - before["rejected"],
               "wall_s": round(wall, 1), "p50_s": round(statistics.median(lat), 2),
               "p95_s": round(lat[int(0.95 * len(lat)) - 1], 2),
               "draft_cache_hits": sum(1 for *_, s in results if s["draft_cached"] > 100)}
    print("load test:", json.dumps(figures))
    out = os.environ.get("PYSPEC_LOAD_FIGURES")  # a file to append the figures to, with the machine
    if out:
        append_result(Path(out), {"bench": "server_load", "clients": 16, "requests_each": 4, "workers": 2,
                                  **figures})
