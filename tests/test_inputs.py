"""A user's input is read whole or refused with a message they can act on:
document bytes in any Unicode encoding, binary data, NUL characters,
encrypted PDFs, bad arguments and options. Nothing can cut the question off
the end of the prompt, and no argument that can be checked waits until a
model has loaded."""

import codecs
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import pyspec_gguf.session
from pyspec_gguf.cli import chat
from pyspec_gguf.cli.main import build_parser, main
from pyspec_gguf.document import first_turn
from pyspec_gguf.sources import NotText, decode_text, read_source

QUESTION = "What was the budget?"


def prompt_ends_with_question(model, text: str, question: str) -> None:
    """The templated prompt of `text` and `question`, tokenized, ends with
    the question and then only what the template closes the turn with."""
    tokens = model.tokenize_prompt([{"role": "user", "content": first_turn(text, question)}])
    # bytes: the tokenizer may split a character of an unassigned plane across tokens
    rendered = b"".join(model.token_bytes(int(t), special=True) for t in tokens)
    closing = model.apply_chat_template([{"role": "user", "content": "Question: "}]).rsplit("Question: ", 1)[1]
    assert rendered.endswith(f"Question: {question}{closing}".encode()), rendered[-200:]


def lines_as_read(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ------------------------------------------------------------------ bytes

UNICODE = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]
WITH_BOM = {"utf-8-sig": b"", "utf-16": b"", "utf-32": b"", "utf-16-le": codecs.BOM_UTF16_LE,
            "utf-16-be": codecs.BOM_UTF16_BE, "utf-32-le": codecs.BOM_UTF32_LE, "utf-32-be": codecs.BOM_UTF32_BE}

# documents: Latin text with any Unicode mixed in (but NUL, which the test
# below inserts), lines ending in \n, \r\n or \r
latin = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=80)
anything = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=20)
line_end = st.sampled_from(["\n", "\r\n", "\r", ""])
documents = st.lists(st.tuples(latin, anything, line_end).map("".join), min_size=1, max_size=12).map("".join)
# questions: what a keyboard types (assigned characters of the basic plane)
questions = st.text(st.characters(max_codepoint=0xFFFF, blacklist_categories=("Cs", "Cc", "Cn", "Co")),
                    min_size=1, max_size=40).filter(str.strip)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(original=documents, encoding=st.sampled_from(UNICODE), bom=st.booleans(), question=questions)
def test_any_unicode_encoding_decodes_to_its_text_or_is_refused(small, tmp_path, original, encoding, bom, question):
    """With a byte-order mark the text comes back exactly; without one,
    UTF-16 and UTF-32 are told by the NULs of their Latin characters (text
    with too few of them is refused, never misread). A leading U+FEFF is a
    byte-order mark by definition, so the documents start with Latin text
    (text of U+xx00 characters alone, with no Latin, would be UTF-16 of the
    other byte order too)."""
    data = (WITH_BOM[encoding] if bom and encoding in WITH_BOM else b"") + original.encode(encoding)
    if not bom and encoding in ("utf-8-sig", "utf-16", "utf-32"):
        data = original.encode(encoding.replace("-sig", "").replace("utf-16", "utf-16-le")
                               .replace("utf-32", "utf-32-le"))
    path = tmp_path / "doc.txt"
    path.write_bytes(data)
    try:
        text, _ = read_source(path)
    except ValueError as e:
        assert str(e), "a refusal says why"
        assume(False)  # refused with a message: allowed
    assert text == lines_as_read(original)
    prompt_ends_with_question(small, text, question)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=4096), question=questions)
def test_binary_is_refused_or_read_and_never_drops_the_question(small, tmp_path, data, question):
    path = tmp_path / "doc.txt"
    path.write_bytes(data)
    try:
        text, _ = read_source(path)
    except ValueError as e:
        assert str(e)
        return
    assert "\0" not in text
    prompt_ends_with_question(small, text, question)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(original=documents, at=st.integers(min_value=0), question=questions)
def test_a_nul_anywhere_is_refused(small, original, at, question):
    at %= len(original) + 1
    with pytest.raises(NotText, match="NUL|not text"):
        decode_text((original[:at] + "\0" + original[at:]).encode("utf-8"))
    with pytest.raises(ValueError, match="NUL"):
        small.tokenize_prompt([{"role": "user", "content": original[:at] + "\0" + original[at:]}])
    with pytest.raises(ValueError, match="NUL"):
        read_source(original[:at] + "\0" + original[at:])


def test_the_reported_cases(small, tmp_path):
    """UTF-16 with its BOM (as Python and Notepad write it) is read; an ELF
    binary and random bytes are refused; a legacy encoding is detected."""
    u16 = tmp_path / "u16.txt"
    u16.write_text("The Larkspur budget was 3.7 million dollars.", encoding="utf-16")
    assert read_source(u16)[0] == "The Larkspur budget was 3.7 million dollars."
    prompt_ends_with_question(small, read_source(u16)[0], QUESTION)
    elf = tmp_path / "elf.txt"
    elf.write_bytes(open(sys.executable, "rb").read(65536))
    with pytest.raises(NotText, match="not text"):
        read_source(elf)
    legacy = tmp_path / "legacy.txt"
    german = ("Der Haushalt für das Rathaus in München betrug 3,7 Millionen Euro. Die Straße wurde gebaut, "
              "und die Bürger waren froh über die Brücke.")
    legacy.write_bytes(german.encode("cp1252"))
    assert read_source(legacy)[0] == german


def test_the_ask_command_refuses_binary_and_reads_utf16(small_path, tmp_path, capsys):
    u16 = tmp_path / "u16.txt"
    u16.write_text("The Larkspur budget was 3.7 million dollars.", encoding="utf-16")
    base = ["--question", "What was the budget?", "--target", str(small_path), "--method", "full", "--max-tokens", "1"]
    assert main(["ask", "--doc", str(u16), *base]) == 0
    err = capsys.readouterr().err
    n_prompt = int(err.split("prompt ")[1].split(" tok")[0])
    assert n_prompt > 25  # the document and the question, not the 12 tokens before the first NUL
    elf = tmp_path / "program.txt"
    elf.write_bytes(open(sys.executable, "rb").read(65536))
    assert main(["ask", "--doc", str(elf), *base]) == 2
    assert "is not text" in capsys.readouterr().err


# ------------------------------------------------------------------ PDFs

def test_an_aes_encrypted_pdf_is_read(tmp_path):
    from fpdf import FPDF
    from pypdf import PdfReader, PdfWriter

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.multi_cell(0, 8, "The Larkspur budget was 3.7 million dollars.")
    plain = tmp_path / "plain.pdf"
    pdf.output(str(plain))
    writer = PdfWriter(clone_from=PdfReader(plain))
    writer.encrypt(user_password="", owner_password="owner", algorithm="AES-128")
    locked = tmp_path / "aes.pdf"
    with open(locked, "wb") as f:
        writer.write(f)
    assert b"/AESV2" in locked.read_bytes()
    assert "Larkspur budget was 3.7 million" in read_source(locked)[0]
    with_password = PdfWriter(clone_from=PdfReader(plain))
    with_password.encrypt(user_password="secret", algorithm="AES-128")
    with open(tmp_path / "password.pdf", "wb") as f:
        with_password.write(f)
    with pytest.raises(ValueError, match="encrypted with a password"):
        read_source(tmp_path / "password.pdf")


def test_a_pdf_failure_is_never_an_empty_document(tmp_path, monkeypatch):
    from fpdf import FPDF
    from pypdf import PageObject

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.multi_cell(0, 8, "Some text.")
    pdf.output(str(tmp_path / "a.pdf"))

    def broken(self, *args, **kwargs):
        raise KeyError("/Font")
    monkeypatch.setattr(PageObject, "extract_text", broken)
    with pytest.raises(ValueError, match="not a readable PDF .*KeyError") as e:
        read_source(tmp_path / "a.pdf")
    assert "empty" not in str(e.value)


def test_pypdf_warnings_stay_quiet_without_verbose(small_path, tmp_path):
    """A PDF pypdf reads past a flaw of: its warnings are not printed unless -v."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.multi_cell(0, 8, "The budget was 3.7 million dollars.")
    path = tmp_path / "flawed.pdf"
    path.write_bytes(b"junk\n" + pdf.output())
    args = ["ask", "--doc", str(path), "--question", QUESTION, "--target", str(small_path), "--method", "full",
            "--max-tokens", "1"]
    quiet = subprocess.run([sys.executable, "-m", "pyspec_gguf", *args], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "invalid pdf header" not in quiet.stderr.lower()
    loud = subprocess.run([sys.executable, "-m", "pyspec_gguf", "-v", *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert "invalid pdf header" in loud.stderr.lower()


# ------------------------------------------------------------------ arguments

def test_serve_help_says_the_budget_it_runs_at():
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    assert parser.parse_args(["serve"]).budget == 0.25
    assert "default 0.25" in " ".join(serve.format_help().split())
    ask = parser._subparsers._group_actions[0].choices["ask"]
    assert parser.parse_args(["ask", "--doc", "d", "--question", "q"]).budget == 1024
    assert "default 1024" in " ".join(ask.format_help().split())


@pytest.mark.parametrize("command", ["ask", "compress", "serve"])
def test_negative_threads_are_refused(tmp_path, capsys, command):
    (tmp_path / "d.txt").write_text("some text")
    doc = ["--doc", str(tmp_path / "d.txt"), "--question", "Q?"] if command != "serve" else []
    assert main([command, *doc, "--threads", "-1", "--target", "/nonexistent.gguf"]) == 2
    assert "threads must be >= 0 (0: all cores)" in capsys.readouterr().err


def test_a_missing_draft_is_reported_before_the_target_loads(small_path, tmp_path, capsys, no_model_loads):
    (tmp_path / "d.txt").write_text("some text")
    missing = str(tmp_path / "missing-draft.gguf")
    for command in (["ask", "--doc", str(tmp_path / "d.txt"), "--question", "Q?"],
                    ["compress", "--doc", str(tmp_path / "d.txt"), "--question", "Q?"],
                    ["chat", "--doc", str(tmp_path / "d.txt")], ["serve"]):
        assert main([*command, "--draft", missing, "--target", str(small_path)]) == 2, command
        assert f"no such model file: {missing}" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="missing-draft"):
        pyspec_gguf.session.SpecSession(draft=missing, target=str(small_path))
    assert no_model_loads == []


def test_compress_refuses_a_kv_method_before_loading(small_path, tmp_path, capsys, no_model_loads):
    (tmp_path / "d.txt").write_text("some text")
    assert main(["compress", "--doc", str(tmp_path / "d.txt"), "--question", "Q?", "--method", "speckv",
                 "--draft", str(small_path), "--target", str(small_path)]) == 2
    assert "speckv does not select prompt tokens" in capsys.readouterr().err
    assert no_model_loads == []


@pytest.mark.parametrize("args,message", [
    (["--budget", "abc"], "argument --budget: a budget is a token count (1024) or a fraction of the prompt (0.25), "
                          "not 'abc'"),
    (["--option", "bogus=1"], "auto has no option 'bogus'; its options: window, kernel"),
    (["--draft-quant", "q3_xs"], "draft_quant must be one of q4_0"),
    (["--draft-layers", "-2"], "draft_layers must be >= 0"),
    (["--n-gpu-layers", "-5"], "n_gpu_layers must be >= -1"),
])
def test_messages_a_user_can_act_on(tmp_path, capsys, no_model_loads, args, message):
    (tmp_path / "d.txt").write_text("some text")
    try:
        rc = main(["ask", "--doc", str(tmp_path / "d.txt"), "--question", "Q?", *args])
    except SystemExit as e:  # argparse's own refusal
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err


def test_chat_budget_command_says_what_a_budget_is(tmp_path):
    c = chat.Chat(None, build_parser().parse_args(["chat", "--doc", "d.txt"]), {})
    with pytest.raises(ValueError, match=r"a budget is a token count \(1024\) or a fraction"):
        c.command("/budget abc")
    with pytest.raises(ValueError, match="auto has no option 'bogus'"):
        c.command("/option bogus=1")


# ------------------------------------------------------------------ progress

class Recorder:
    """A progress object: which stages began, and the counts within each."""

    def __init__(self):
        self.events = []

    def __call__(self, done, total):
        self.events.append((done, total))

    def stage(self, name):
        self.events.append(name)


@pytest.mark.parametrize("method", ["specpc", "speckv"])
def test_progress_names_every_stage(small_pair, prose, method):
    progress = Recorder()
    messages = [{"role": "user", "content": first_turn(prose, "Who kept the ledger?")}]
    small_pair.generate(messages, method=method, budget=100, max_tokens=2, progress=progress, lookahead=8)
    stages = [e for e in progress.events if isinstance(e, str)]
    expected = {"specpc": ["draft_prefill", "lookahead", "scoring", "target_prefill"],
                "speckv": ["draft_prefill", "lookahead", "target_prefill", "scoring", "eviction", "target_prefill"]}
    assert stages == expected[method]
    # counts within the lookahead and the target's prefill, not only the draft's
    after = progress.events[progress.events.index("lookahead") + 1:]
    assert (1, 8) in after[: after.index(stages[stages.index("lookahead") + 1])]
    target = progress.events[progress.events.index("target_prefill") + 1:]
    assert target and isinstance(target[0], tuple) and target[0][0] > 0


def test_a_warning_during_a_bar_stands_on_its_own_line(capsys):
    from pyspec_gguf._log import logger
    from pyspec_gguf.cli.common import progress_bar

    with progress_bar("reading the document") as progress:
        progress(10, 100)
        logger.warning("refusing the saved document state (test)")
        progress(20, 100)
    err = capsys.readouterr().err
    line = next(seg for seg in err.replace("\n", "\r").split("\r") if "refusing" in seg)
    assert line.startswith("refusing the saved document state"), repr(err)
