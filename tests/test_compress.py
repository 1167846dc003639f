"""Compressed prompts spell exactly the kept tokens, in order, per message;
stop strings cut answers; a cancelled answer stops and gives its contexts
back; the prefix pool reuses, evicts and lends its caches as it says."""

import numpy as np
import pytest

from pyspec_gguf.compress import cut, from_kept
from pyspec_gguf.prefix import PrefixPool
from pyspec_gguf.session import Cancelled, StopScanner


@pytest.fixture(scope="module")
def session(small_pair):
    return small_pair


def test_stop_scanner_holds_back_what_may_begin_a_stop():
    s = StopScanner(["END"])
    assert [s.feed(p) for p in ("abcE", "N", "x")] == ["abc", "", "ENx"]
    assert not s.stopped and s.flush() == ""
    s = StopScanner(["o w", "zz"])
    assert [s.feed(p) for p in ("Hel", "lo wor", "ld")] == ["Hel", "l", ""]
    assert s.stopped and s.flush() == ""
    s = StopScanner(["END"])
    assert s.feed("tail E") == "tail " and s.flush() == "E"  # the stream ended without the stop


def test_cut_marks_each_dropped_run():
    text = b"aa bb cc dd ee"
    starts, ends = np.array([0, 2, 5, 8, 11]), np.array([2, 5, 8, 11, 14])
    keep = np.array([False, True, False, True, True])
    assert cut(text, 0, 14, starts, ends, keep, " |") == " | bb | dd ee"
    assert cut(text, 0, 14, starts, ends, keep, "") == " bb dd ee"
    assert cut(text, 3, 10, starts, ends, keep, "#") == "bb# d"  # clipped to the span
    assert cut(text, 0, 14, starts, ends, np.zeros(5, bool), "#") == ""


def test_compressed_text_spells_the_kept_tokens(session, prose):
    prompt = f"{prose[:1100]} The vault code is 4471. {prose[1100:]}"
    short = session.compress(prompt, budget=120, marker="")
    tokens = session.tokenize(prompt)
    assert short.kept_tokens == 120 and short.prompt_tokens == len(tokens)
    assert short.text == session.target.detokenize(tokens[short.kept])
    assert 100 <= short.compressed_tokens <= 130
    assert short.times["draft_prefill"] > 0
    # a budget the prompt fits in leaves it whole
    assert session.compress(prompt, budget=len(tokens) + 1).text == prompt


def test_compressed_messages_keep_roles_and_order(session, prose):
    question = "What is the vault code?"
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"{prose[:1100]} The vault code is 4471. {prose[1100:]}\nQuestion: {question}"}]
    short = session.compress(messages, budget=150, protect_last=12)
    assert [m["role"] for m in short.messages] == ["system", "user"]
    assert short.messages[0]["content"] == "Answer briefly."  # short, and all of it scored high enough
    user = short.messages[1]["content"]
    assert user.endswith(question) and " …" in user
    assert all(run in messages[1]["content"] for run in user.split(" …") if run)
    # the same positions from an answer's kept set give the same text
    r = session.generate(messages, "specpc", 150, max_tokens=4, protect_last=12)
    assert from_kept(session, messages, r.prompt_tokens, r.kept).messages == short.messages
    with pytest.raises(ValueError, match="prompt method"):
        session.compress(messages, method="snapkv")


def test_cancel_stops_an_answer(session, prose):
    stream = session.generate(prose, "full", max_tokens=400, stream=True)
    pieces = iter(stream)
    next(pieces)
    stream.cancel()
    with pytest.raises(Cancelled):
        list(pieces)
    assert stream.result is None
    # cancelled before it began: the passes never run
    stream = session.generate(prose, "specpc", 64, max_tokens=4, stream=True)
    stream.cancel()
    with pytest.raises(Cancelled):
        stream.run()
    # and the session answers on
    assert session.generate(prose, "specpc", 64, max_tokens=4).text


def test_stop_string_ends_the_answer(session, prose):
    whole = session.generate(prose, "full", max_tokens=24)
    assert whole.finish_reason == "length"
    word = " " + whole.text.split()[3]
    cut_ = session.generate(prose, "full", max_tokens=24, stop=[word])
    assert cut_.text == whole.text[: whole.text.index(word)] and cut_.finish_reason == "stop"


def test_prefix_pool_reuses_lends_and_evicts(small):
    pool = PrefixPool(small, {"n_threads": 1, "n_batch": 64, "n_ubatch": 64}, slots=2)
    a, b, c = (np.arange(100, dtype=np.int32) + k for k in (0, 1000, 2000))
    first = pool.take(a)
    first.hold(a)
    other = pool.take(a)
    assert other is not first  # lent out: a second taker gets another cache
    other.hold(b)
    pool.give_back(first)
    assert pool.take(np.concatenate([a, b[:10]])) is first  # its longest common prefix wins
    assert pool.take(a) is None  # both lent, no slot left: the prompt runs uncached
    pool.give_back(first)
    pool.give_back(other)
    assert pool.take(c) is other  # nothing shared, no free slot: the least recently used
    pool.close()
