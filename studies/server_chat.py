"""A chat about one long document through the OpenAI-compatible server, as
a chat client sends it: every turn resends the document and the history.
Per turn: time to first token seen by the client, the server's own figures
(draft and target prefix-cache hits, kept tokens) and whether the answer
holds the right number; for each method asked, in a fresh server.

    python -P studies/server_chat.py --tokens 8192 --questions 5 --methods specpc,full

Needs the server and test extras (the official `openai` client). The
conversation is `studies/document.py`'s (`bench.tasks.make_conversation`):
one magic number per question hidden in the benchmark's haystack. Rows are
appended to --out as they come.

Reproduces bench/README.md, "The same chat through the OpenAI-compatible server
(server_chat.jsonl)".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pyspec_gguf import registry
from pyspec_gguf.bench.common import append_result, script
from pyspec_gguf.bench.tasks import make_conversation
from pyspec_gguf.document import first_turn, later_turn
from pyspec_gguf.engine import Model


def start(args, method: str, port: int):
    cmd = [sys.executable, "-P", "-m", "pyspec_gguf", "serve", "--port", str(port), "--method", method,
           "--budget", str(args.budget), "--min-prompt-tokens", "0", "--max-tokens", str(args.max_tokens)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the server exited")
            time.sleep(1)
    proc.kill()
    raise SystemExit("the server did not start")


def converse(client, model_id: str, text: str, questions: list, base: dict, out: Path) -> None:
    messages = []
    for turn, (question, value) in enumerate(questions, 1):
        messages.append({"role": "user", "content": first_turn(text, question) if turn == 1 else later_turn(question)})
        t0 = time.perf_counter()
        first, pieces, stats = None, [], None
        for chunk in client.chat.completions.create(model=model_id, messages=messages, stream=True):
            if chunk.choices:
                piece = chunk.choices[0].delta.content
                if piece and first is None:
                    first = time.perf_counter() - t0
                pieces.append(piece or "")
                stats = (chunk.model_extra or {}).get("pyspec") or stats
        answer = "".join(pieces)
        messages.append({"role": "assistant", "content": answer})
        row = {**base, "turn": turn, "client_ttft_s": first, "total_s": time.perf_counter() - t0,
               "expected": value, "correct": value in answer, "answer": answer, "server": stats}
        append_result(out, row)
        print(f"{base['method']:8s} turn {turn}: ttft {first:.2f} s, draft cached {stats['draft_cached']}, "
              f"target cached {stats['target_cached']}, prompt {stats['prompt_tokens']}, "
              f"{'right' if row['correct'] else 'wrong'}", flush=True)


def main(args) -> None:
    from openai import OpenAI

    out = Path(args.out)
    with Model(registry.default_model("target"), progress=False) as target:
        text, questions = make_conversation(target, args.tokens, args.questions, args.seed)
    for method in args.methods.split(","):
        proc = start(args, method, args.port)
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="unused", timeout=1200,
                            max_retries=0)
            model_id = client.models.list().data[0].id
            base = {"bench": "server_chat", "method": method, "budget": args.budget, "tokens": args.tokens,
                    "seed": args.seed}
            converse(client, model_id, text, questions, base, out)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(summary(out, args.tokens, args.seed))


def summary(path: Path, tokens: int, seed: int) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["tokens"] == tokens and r["seed"] == seed]
    lines = ["| method | turn | prompt tok | draft/target cached | client TTFT s | right |", "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["server"]
        lines.append(f"| {r['method']} | {r['turn']} | {s['prompt_tokens']} | {s['draft_cached']}/{s['target_cached']} "
                     f"| {r['client_ttft_s']:.2f} | {'yes' if r['correct'] else 'no'} |")
    return "\n".join(lines)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--questions", type=int, default=5)
    p.add_argument("--methods", default="specpc,full")
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--out", default="bench/results/server_chat.jsonl")


if __name__ == "__main__":
    script(__doc__, add_cli_args, main, lambda a: summary(Path(a.out), a.tokens, a.seed))
