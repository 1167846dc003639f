"""Chat with a document: the draft reads it once, a question reuses the
cached prefix and selects exactly as a cold `generate` of the same prompt;
the conversation stays in the prompt; saved states are checked before use;
PDF and HTML are read as text; the chat command runs end to end."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pyspec_gguf import SpecSession
from pyspec_gguf.cli import chat
from pyspec_gguf.cli.main import build_parser
from pyspec_gguf.sources import read_html, read_source
from pyspec_gguf.store import FORMAT, STATES_ENV, StateFileError, read_state, tokens_sha256, write_state

NEEDLE = "The secret code for the vault is 4471."
QUESTION = "What is the secret code for the vault?"
BUDGET = 160


@pytest.fixture(scope="module")
def text(prose):
    """About 480 tokens of prose with one fact in the middle."""
    sentences = prose.split(". ")
    middle = len(sentences) // 2
    return f"{'. '.join(sentences[:middle])}. {NEEDLE} {'. '.join(sentences[middle:])}"


@pytest.fixture(scope="module")
def session(small_path):
    # flash attention off: only then does a cached prefix compute to the last
    # bit what a cold prefill does (test_flash_attention_auto_keeps_the_same_cells
    # bounds the difference with the default on)
    with SpecSession(draft=str(small_path), target=str(small_path), flash_attn="off", progress=False) as s:
        yield s


@pytest.fixture
def docs_dir(tmp_path, monkeypatch):
    """Saved states go to a scratch cache directory (the models stay where they are)."""
    monkeypatch.setattr("pyspec_gguf.store.cache_dir", lambda: tmp_path)
    monkeypatch.delenv(STATES_ENV)  # the cache folder's documents/, as a user's
    return tmp_path / "documents"


@pytest.fixture(scope="module")
def doc(session, text):
    with session.document(text, cache=False) as d:
        yield d


# SpecKV drafts 2 tokens here, not its default 64: warm and cold are not the
# same llama.cpp computation (the cached prefix was prefilled in other batch
# shapes, the last prompt token decoded alone), so the draft's logits differ
# in the last bits, and a longer greedy lookahead can flip at a near-tie (on
# this text: the second question's third drafted token), after which the
# drafted rows, and so the scores, differ. The pipeline's claim is the same
# selection from the same drafted tokens; two of them still decode one
# token into the cache and roll it back.
SHORT_LOOKAHEAD = {"lookahead": 2}

# the prompt side, the cascade, the KV side, and `full` from the target's cache
CASES = [("specpc", {}), ("speckv_pc", {"pc_budget": 300}), ("speckv", SHORT_LOOKAHEAD), ("full", {})]


@pytest.mark.parametrize("method,options", CASES)
def test_cached_selection_equals_cold(session, doc, method, options):
    """Two turns: each question's kept set, scores and answer are those of a
    cold `generate` on the same full prompt, and the passes over the whole
    prompt prefilled only what followed their cached prefix."""
    doc.forget()
    for turn, question in enumerate((QUESTION, "Who kept the ledger?")):
        messages = doc.messages(question)
        warm = doc.ask(question, method=method, budget=BUDGET, max_tokens=12, **options)
        cold = session.generate(messages, method=method, budget=BUDGET, max_tokens=12,
                                protect_last=doc.protect_last(question), **options)
        assert np.array_equal(warm.prompt_tokens, cold.prompt_tokens)
        assert np.array_equal(warm.kept, cold.kept)
        if cold.scores is not None:
            np.testing.assert_allclose(warm.scores, cold.scores, rtol=1e-4, atol=1e-6)
        # the second turn's answer follows a history prefilled in other batch
        # shapes than a cold prompt's, and for this 135M model it is a
        # near-tie (seen: "The miller kept the secret code…" against "The
        # secret code for the vault is 4471"): only the first is held equal
        if turn == 0:
            assert warm.text == cold.text
        n = len(warm.prompt_tokens)
        if method in ("full", "speckv") and turn:
            assert len(doc.prefix) - 70 <= warm.stats.target_cached < n  # the document was not prefilled again
        if method != "full":
            assert len(doc.prefix) - 70 <= warm.stats.draft_cached < n
    assert doc.turns[0][0] == QUESTION and len(doc.turns) == 2


def test_conversation_keeps_its_history(session, doc):
    doc.forget()
    first = doc.ask(QUESTION, method="specpc", budget=BUDGET, max_tokens=12)
    second = doc.ask("Repeat the code.", method="specpc", budget=BUDGET, max_tokens=12)
    prompt = session.target.detokenize(second.prompt_tokens, special=True)
    assert first.text.strip() and first.text.strip() in prompt
    assert prompt.count("Question:") == 2 and prompt.index(QUESTION) < prompt.index("Repeat the code.")
    # the second question reused the whole first prompt and the answer's text
    assert second.stats.draft_cached >= len(first.prompt_tokens) - 70
    assert [q for q, _ in doc.turns] == [QUESTION, "Repeat the code."]
    doc.forget()
    assert doc.messages("x") == [{"role": "user", "content": doc.messages("x")[0]["content"]}]


def test_an_interrupted_answer_leaves_no_turn_and_a_sound_cache(session, doc):
    """Ctrl-C during the draft's prefill or during the answer: no turn is
    added, and the next answer still equals a cold one."""
    doc.forget()

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        doc.ask(QUESTION, progress=interrupt)
    stream = doc.ask(QUESTION, method="speckv", budget=BUDGET, max_tokens=12, stream=True)
    pieces = iter(stream)
    next(pieces)
    pieces.close()
    assert doc.turns == []
    for method, options in (("speckv", SHORT_LOOKAHEAD),):  # the path that rolls the lookahead back
        messages = doc.messages(QUESTION)
        warm = doc.ask(QUESTION, method=method, budget=BUDGET, max_tokens=12, **options)
        cold = session.generate(messages, method=method, budget=BUDGET, max_tokens=12,
                                protect_last=doc.protect_last(QUESTION), **options)
        assert np.array_equal(warm.kept, cold.kept) and warm.text == cold.text
        doc.forget()


def _split(kept, doc_end):
    return kept[kept < doc_end], kept[kept >= doc_end]


def test_reuse_kept_prefills_only_the_newly_kept_tokens(session, text):
    """With `reuse_kept` a prompt-side question's target keeps the KV of the
    document tokens kept so far: the first answer is a cold `generate`'s,
    the second prefills only the document tokens it newly keeps and its
    part of the conversation, after the held ones, and answers from their
    union. A question stopped in the target's prefill leaves the cache
    sound for the next."""
    second = "Who kept the ledger?"
    with session.document(text, cache=False, reuse_kept=True) as d:
        end = len(d.prefix)
        cold = session.generate(d.messages(QUESTION), method="specpc", budget=BUDGET, max_tokens=12,
                                protect_last=d.protect_last(QUESTION))
        first = d.ask(QUESTION, method="specpc", budget=BUDGET, max_tokens=12)
        assert np.array_equal(first.kept, cold.kept) and first.text == cold.text
        assert first.stats.target_cached == 0 and first.stats.kept_tokens == BUDGET
        held, _ = _split(first.kept, end)

        messages = d.messages(second)
        cold = session.generate(messages, method="specpc", budget=BUDGET, max_tokens=12,
                                protect_last=d.protect_last(second))
        stopped = _StopAt("target_prefill")
        with pytest.raises(KeyboardInterrupt):
            d.ask(second, method="specpc", budget=BUDGET, max_tokens=12, progress=stopped)
        warm = d.ask(second, method="specpc", budget=BUDGET, max_tokens=12)
        doc_kept, talk = _split(cold.kept, end)
        new = np.setdiff1d(doc_kept, held)
        assert len(new) > 0 and len(np.intersect1d(doc_kept, held)) > 0  # the case this test is for
        assert np.array_equal(warm.kept, np.union1d(held, cold.kept))
        assert warm.stats.kept_tokens == len(held) + len(new) + len(talk) > BUDGET
        assert warm.stats.target_cached >= len(held)
        assert warm.stats.kept_tokens - warm.stats.target_cached <= len(new) + len(talk)
        assert d.kv_bytes["target"] >= warm.stats.kept_tokens * session.target.kv_bytes_per_token
        assert len(d.turns) == 2


class _StopAt:
    """A progress callback that stops the call as stage `name` begins."""

    def __init__(self, name):
        self.name = name

    def __call__(self, done, total):
        pass

    def stage(self, name):
        if name == self.name:
            raise KeyboardInterrupt


def test_kept_cache_order_and_growth():
    """The held document positions first, then the newly kept ones, then
    the conversation's; past `growth` times the question's own selection
    from the document, the question starts again from it."""
    from pyspec_gguf.prefix import KeptCache
    cache = KeptCache(None, {}, doc_end=100, growth=2.0)
    cache.held = np.array([3, 7, 50], np.int32)
    order = cache.order(np.array([2, 7, 60, 120, 130], np.int32))
    assert order.tolist() == [3, 7, 50, 2, 60, 120, 130]
    cache.held = np.array([1, 3, 5, 9, 11], np.int32)
    assert cache.order(np.array([2, 4, 101], np.int32)).tolist() == [2, 4, 101]  # 7 > 2 x 2: start again
    with pytest.raises(ValueError, match="growth"):
        KeptCache(None, {}, doc_end=100, growth=0.5)


def test_flash_attention_auto_keeps_the_same_cells(session, small_path, text):
    """The default, flash attention as llama.cpp sets it (on, on a CPU):
    scores come from the queries and cached keys instead of llama.cpp's
    softmax, and a cached prefix computes in other batch shapes than a cold
    prefill, so near-ties may fall the other way, but only near-ties: the
    kept sets share at least 90% of their cells with a cold prefill's and
    with flash attention off (measured here: 94-100% for SpecKV and SpecPC
    either way; a random choice of 160 of these 516 cells would share about
    a third), and the fact is still found."""
    with SpecSession(draft=str(small_path), target=str(small_path), progress=False) as auto, \
            auto.document(text, cache=False) as d:
        assert auto.context_options["flash_attn"] == "auto"
        # SpecKV's cached against its cold selection; SpecPC's against flash attention off
        for method, options, other in (("speckv", SHORT_LOOKAHEAD, auto), ("specpc", {}, session)):
            messages = d.messages(QUESTION)
            warm = d.ask(QUESTION, method=method, budget=BUDGET, max_tokens=12, **options)
            d.forget()
            cold = other.generate(messages, method=method, budget=BUDGET, max_tokens=12,
                                  protect_last=d.protect_last(QUESTION), **options)
            shared = len(np.intersect1d(warm.kept, cold.kept))
            assert shared >= 0.9 * len(cold.kept), (method, shared, len(cold.kept))
            assert "4471" in warm.text and "4471" in cold.text, method


# ---------------------------------------------------------------- on disk

def test_save_and_load(session, text, docs_dir):
    with session.document(text) as first:
        assert first.loaded_from is None
        path = first.save()
        answer = first.ask(QUESTION, method="specpc", budget=BUDGET, max_tokens=12)
    assert path.parent == docs_dir and path.stat().st_size > 1000
    with session.document(text) as again:
        assert again.loaded_from == path
        reloaded = again.ask(QUESTION, method="specpc", budget=BUDGET, max_tokens=12)
    assert np.array_equal(reloaded.kept, answer.kept) and reloaded.text == answer.text
    with session.document(text, cache=False) as cold:
        assert cold.loaded_from is None


def test_each_question_moves_the_kv_at_most_once_each_way(session, text, docs_dir):
    """What a document chat copies between llama.cpp's buffers and the host
    (over the bus on a GPU): a KV-side question reads the target's cached
    document once and writes the kept entries back once; a prompt-side one
    moves no KV; a save reads the draft's state once, a load writes it once."""
    from pyspec_gguf.engine import transfers, transfers_since
    with session.document(text) as d:
        for question in (QUESTION, "Who is the text about?"):
            kv = d.ask(question, method="speckv", budget=BUDGET, max_tokens=4, **SHORT_LOOKAHEAD).stats
            assert kv.transfers["state_read"][0] == kv.transfers["state_write"][0] == 1, question
        pc = d.ask("And where?", method="specpc", budget=BUDGET, max_tokens=4).stats
        assert pc.transfers["state_read"] == pc.transfers["state_write"] == [0, 0]
        before = transfers()
        d.save()
        saved = transfers_since(before)
    assert saved["state_read"][0] == 1 and saved["state_write"][0] == 0
    before = transfers()
    with session.document(text) as again:
        assert again.loaded_from is not None
    loaded = transfers_since(before)
    assert loaded["state_read"][0] == 0 and loaded["state_write"][0] == 1


def _flip(path, offset_from_end):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["corrupt", "other model"])  # every check: test_read_state_checks_everything
def test_a_bad_saved_state_is_refused_and_rebuilt(session, text, docs_dir, damage, caplog):
    with session.document(text) as first:
        path = first.save()
        answer = first.ask(QUESTION, method="specpc", budget=BUDGET, max_tokens=12)
    if damage == "corrupt":
        _flip(path, 100)
    else:
        write_state(path, first.prefix, path.read_bytes()[-1000:], "0" * 64)
    with session.document(text) as again:
        assert again.loaded_from is None  # refused, read again
        assert np.array_equal(again.ask(QUESTION, method="specpc", budget=BUDGET, max_tokens=12).kept, answer.kept)
    assert "refusing the saved document state" in caplog.text
    with session.document(text) as third:  # the refused file was replaced by a good one
        assert third.loaded_from == path


def test_read_state_checks_everything(tmp_path):
    tokens = np.arange(50, dtype=np.int32)
    path = tmp_path / "d.psgdoc"
    write_state(path, tokens, b"state bytes" * 100, "a" * 64, "d.txt")
    assert read_state(path, tokens, "a" * 64) == b"state bytes" * 100
    with pytest.raises(StateFileError, match="another draft model"):
        read_state(path, tokens, "b" * 64)
    with pytest.raises(StateFileError, match="another document"):
        read_state(path, tokens + 1, "a" * 64)
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(StateFileError, match="truncated"):
        read_state(path, tokens, "a" * 64)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(StateFileError, match="checksum"):
        read_state(path, tokens, "a" * 64)
    path.write_bytes(data[:8] + (FORMAT + 1).to_bytes(4, "little") + data[12:])
    with pytest.raises(StateFileError, match="format"):
        read_state(path, tokens, "a" * 64)
    path.write_bytes(b"xx")
    with pytest.raises(StateFileError, match="truncated"):
        read_state(path, tokens, "a" * 64)
    assert len(tokens_sha256(tokens)) == 64 and not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------- sources

def test_pdf_text_comes_back(tmp_path):
    from fpdf import FPDF

    pdf = FPDF()
    for page in ("The first page says the budget is 4.2 million euros.", "The second page names Ada Lovelace."):
        pdf.add_page()
        pdf.set_font("helvetica", size=12)
        pdf.multi_cell(0, 8, page)
    path = tmp_path / "report.pdf"
    pdf.output(str(path))
    text, name = read_source(str(path))
    assert name == "report.pdf"
    assert "budget is 4.2 million euros" in text and "names Ada Lovelace" in text
    assert text.index("4.2 million") < text.index("Lovelace")


def test_html_visible_text_only(tmp_path):
    page = ("<html><head><title>T</title><style>p {color: red}</style><script>var secret = 1;</script></head>"
            "<body><h1>Report</h1><p>The budget is <b>4.2</b> million.</p><ul><li>one</li><li>two</li></ul>"
            "<table><tr><td>a</td><td>b</td></tr></table></body></html>")
    path = tmp_path / "page.html"
    path.write_text(page)
    text = read_source(path)[0]
    assert "The budget is 4.2 million." in text and "secret" not in text and "color" not in text
    assert text.splitlines()[0] == "Report" and "one\ntwo" in text and "a\tb" in text
    assert read_html("<p>x</p><p>y</p>") == "x\n\ny"


@pytest.mark.parametrize("name,content,error,match", [
    ("missing.txt", None, FileNotFoundError, "no such document"),
    ("notes.docx", b"PK\x03\x04", ValueError, "unsupported document type '.docx'"),
    ("empty.md", b"  \n", ValueError, "is empty"),
    ("broken.pdf", b"%PDF-1.4 nothing", ValueError, "PDF"),
])
def test_bad_sources(tmp_path, name, content, error, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=match):
        read_source(path)


def test_text_is_text_and_a_path_is_a_path(tmp_path):
    assert read_source("What a lovely day.")[0] == "What a lovely day."
    assert read_source("two\nlines.pdf")[0] == "two\nlines.pdf"
    (tmp_path / "a.txt").write_text("hello")
    assert read_source(str(tmp_path / "a.txt")) == ("hello", "a.txt")


def test_a_document_longer_than_the_trained_context(session, prose):
    limit = session.target.n_ctx_train
    assert limit > 0
    with pytest.raises(ValueError, match=f"more than the {limit:,} that .* was trained for"):
        session.document(" ".join([prose] * (limit // 100)))


def test_empty_question(doc):
    with pytest.raises(ValueError, match="question is empty"):
        doc.ask("  ")


# ---------------------------------------------------------------- chat command

def test_chat_command_end_to_end(small_path, text, tmp_path):
    """Questions, commands and bad commands through stdin; Ctrl-D ends it."""
    (tmp_path / "notes.txt").write_text(text)
    lines = [QUESTION, "/budget 0", "/budget 300", "/method nope", "/method speckv", "/option window=8",
             "/option nope=1", "Who kept the ledger?", "/method specpc", "Where is the vault?",
             "Who kept the ledger?", "/kept", "/save", "/reset", "/help", "/what"]
    env = {k: v for k, v in os.environ.items() if k != STATES_ENV}  # the states go where a user's go
    env["PYSPEC_GGUF_CACHE"] = str(tmp_path / "cache")  # the models are given by path
    done = subprocess.run([sys.executable, "-m", "pyspec_gguf", "chat", "--doc", str(tmp_path / "notes.txt"),
                           "--draft", str(small_path), "--target", str(small_path), "--max-tokens", "12",
                           "--reuse-kept"],
                          input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=900, env=env,
                          cwd=tmp_path)  # the installed package, not the source tree (no compiled extension there)
    out, err = done.stdout, done.stderr
    assert done.returncode == 0, err[-3000:]
    assert "notes.txt: " in err and "tokens, read in" in err
    # the first question through the default, auto (the draft read the document: specpc, or full if faster)
    assert len(re.findall(r"\[(full|specpc), auto: [^]]+\] prompt", err)) == 1 and err.count("[speckv] prompt") == 1
    assert "cached: draft" in err
    # --reuse-kept: the second specpc question found the first one's kept tokens in the target's cache
    held = re.findall(r"\[specpc\] prompt \d+ tok, cached: draft \d+, target (\d+)", err)
    assert len(held) == 2 and int(held[1]) > 0
    assert "budget 0 keeps nothing" in err and "unknown method 'nope'" in err and "nope" in err
    assert "budget: 300" in out and "method: speckv" in out and "{'window': 8}" in out
    assert "[…" in out and "saved: " in out and "conversation forgotten" in out and "/kept" in out
    assert "unknown command /what" in out
    saved = Path(out.split("saved: ")[1].split()[0])
    assert saved.is_file() and saved.parent == tmp_path / "cache" / "documents"


def test_chat_ctrl_c_stops_the_answer_and_keeps_the_session(session, text, monkeypatch, capsys):
    args = build_parser().parse_args(["chat", "--doc", "x.txt", "--max-tokens", "12", "--budget", "300"])
    with session.document(text, cache=False) as d:
        c = chat.Chat(d, args, {})
        monkeypatch.setattr(chat, "print_answer", _interrupting_print_answer)
        c.ask(QUESTION)
        assert "answer stopped" in capsys.readouterr().err and d.turns == []
        monkeypatch.undo()
        c.ask(QUESTION)
        assert len(d.turns) == 1 and re.search(r"\[(full|specpc), auto: [^]]+\] prompt", capsys.readouterr().err)


def _interrupting_print_answer(stream, progress, label=None):
    """As the terminal does on Ctrl-C: KeyboardInterrupt after the first piece."""
    pieces = iter(stream)
    try:
        next(pieces)
        raise KeyboardInterrupt
    finally:
        pieces.close()


def test_chat_refuses_bad_input_before_loading_a_model(tmp_path, capsys):
    from pyspec_gguf.cli.main import main
    (tmp_path / "d.txt").write_text("some text")
    assert main(["chat", "--doc", str(tmp_path / "d.txt"), "--budget", "0", "--target", "/nonexistent.gguf"]) == 2
    assert "keeps nothing" in capsys.readouterr().err
    assert main(["chat", "--doc", str(tmp_path / "nope.txt")]) == 2  # the registry's pair, not loaded
    assert "no such document" in capsys.readouterr().err
    assert main(["chat", "--doc", str(tmp_path / "d.txt"), "--draft", "/nonexistent.gguf"]) == 2
    assert "no such model file: /nonexistent.gguf" in capsys.readouterr().err
