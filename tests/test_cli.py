"""The command line, in process."""

import pytest

from pyspec_gguf.cli.main import main


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-1.5b-instruct-q4_k_m" in out and "target" in out


def test_ask_compare_and_show_kept(small_path, prose, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(prose)
    args = ["ask", "--doc", str(doc), "--question", "What colour was the notebook?", "--draft", str(small_path),
            "--target", str(small_path), "--method", "specpc", "--budget", "120", "--max-tokens", "6",
            "--compare", "--show-kept", "--option", "window=16"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "--- full:" in out and "--- specpc:" in out
    assert "[…" in out  # dropped spans marked in the shown prompt
    assert "[full] prompt" in err and "[specpc] prompt" in err and "kept 120" in err


def test_ask_speculates_and_says_so(small_path, prose, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(prose)
    base = ["ask", "--doc", str(doc), "--question", "Tell the story of the fox.", "--draft", str(small_path),
            "--target", str(small_path), "--method", "specpc", "--budget", "120", "--max-tokens", "16"]
    assert main(base) == 0
    plain, plain_err = capsys.readouterr()
    assert "drafted tokens accepted" not in plain_err
    assert main(base + ["--speculative", "draft"]) == 0
    out, err = capsys.readouterr()
    assert out == plain and "(draft: " in err and "drafted tokens accepted" in err


@pytest.mark.parametrize("args,match", [
    (["--budget", "0"], "budget"),
    (["--method", "speckv", "--option", "kernel=4"], "odd"),
    (["--option", "nokeyvalue"], "KEY=VALUE"),
])
def test_ask_bad_input_is_an_error_message(small_path, prose, tmp_path, capsys, args, match):
    doc = tmp_path / "doc.txt"
    doc.write_text(prose)
    base = ["ask", "--doc", str(doc), "--question", "Q?", "--draft", str(small_path), "--target", str(small_path)]
    assert main(base + args) == 2
    assert match in capsys.readouterr().err


def test_ask_empty_doc(tmp_path, capsys, small_path):
    doc = tmp_path / "empty.txt"
    doc.write_text("  \n")
    assert main(["ask", "--doc", str(doc), "--question", "Q?", "--target", str(small_path), "--method", "full"]) == 2
    assert "empty" in capsys.readouterr().err


@pytest.mark.parametrize("args,match", [
    (["--budget", "0"], "budget 0 keeps nothing: give a token count"),
    (["--method", "speckv", "--option", "kernel=8"], "kernel must be odd"),
    (["--option", "nope=1"], "auto has no option 'nope'; its options: window"),  # specpc's, for auto's specpc
    (["--question", "  "], "--question is empty"),
])
def test_ask_refuses_bad_input_before_loading_a_model(prose, tmp_path, capsys, args, match):
    """The models named do not exist: the error must come from the checks
    that run before any model loads, alone on its line."""
    doc = tmp_path / "doc.txt"
    doc.write_text(prose)
    missing = str(tmp_path / "missing.gguf")
    base = ["ask", "--doc", str(doc), "--question", "Q?", "--draft", missing, "--target", missing]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert match in err and "missing.gguf" not in err
    assert err.startswith("pyspec-gguf: error: ")
