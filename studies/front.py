"""The front (`serve --upstream`) against the engine it fronts, as a chat
client sees them: llama-cpp-python's OpenAI-compatible server holds the
target; each benchmark prompt is sent to it straight and through the front
(the draft compresses it to the budget, the engine answers the kept text),
in alternating order. Per way: the client's time to first token, the whole
answer's time, its score, and the front's figures.

    python -P studies/front.py --tokens 8192 --tasks niah_single --seeds 0,1,2
    python -P studies/front.py --tokens 8192 --target standin:qwen2.5-7b --seeds 0   # times only

Needs the server and test extras (llama-cpp-python's server, the official
`openai` client). Both servers use every thread (`--threads`), the engine
flash attention on (llama-server's default on a CPU). Before each timed
request the engine answers a one-word prompt, so that no request finds the
last one's tokens in its KV. The front's draft cache is off (every prompt
cold). Rows are appended as they come; the same command later skips what
is done.

Reproduces bench/README.md, "Through the front (front.jsonl)".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from statistics import median

from pyspec_gguf import registry
from pyspec_gguf.bench.common import (add_prompt_set_args, append_result, paired_interval, read_rows, script,
                                      seeds_of)
from pyspec_gguf.bench.standin import is_standin, model_path
from pyspec_gguf.bench.tasks import make_task
from pyspec_gguf.engine import Model

WAYS = ("straight", "front")


def _start(cmd: list, ready: str):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(ready, timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"{cmd[2]} exited")
            time.sleep(1)
    proc.kill()
    raise SystemExit(f"{cmd[2]} did not start")


def _ask(client, messages: list, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, pieces, figures = None, [], None
    for chunk in client.chat.completions.create(model="target", messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            pieces.append(chunk.choices[0].delta.content)
        figures = (chunk.model_extra or {}).get("pyspec") or figures
    return {"ttft_s": first, "total_s": time.perf_counter() - t0, "answer": "".join(pieces), "front": figures}


def main(args) -> None:
    from openai import OpenAI

    out = Path(args.out)
    standin = is_standin(args.target)
    target = model_path(args.target) if args.target else str(registry.resolve(registry.default_model("target")))
    draft = registry.default_model("draft")
    threads = str(args.threads or os.cpu_count())
    seeds = seeds_of(args)
    done = {(r["prompt_tokens_asked"], r["seed"], r["task"], r["budget"]) for r in read_rows(out)
            if r["models"]["target"] == Path(target).name}
    with Model(target, progress=False) as model:
        tasks = [(seed, name, make_task(name, model, args.tokens, seed)) for seed in seeds
                 for name in args.tasks.split(",") if (args.tokens, seed, name, args.budget) not in done]
    if not tasks:
        print(summary(out, args.tokens, args.budget))
        return
    engine_port, front_port = args.port, args.port + 1
    engine = _start([sys.executable, "-m", "llama_cpp.server", "--model", target, "--port", str(engine_port),
                     "--n_ctx", str(args.tokens + 2048), "--n_threads", threads, "--n_threads_batch", threads,
                     "--flash_attn", "true", "--verbose", "false", "--interrupt_requests", "false"],
                    f"http://127.0.0.1:{engine_port}/v1/models")
    front = None
    try:
        front = _start([sys.executable, "-P", "-m", "pyspec_gguf", "serve", "--port", str(front_port),
                        "--draft", draft, "--upstream", f"http://127.0.0.1:{engine_port}/v1",
                        "--budget", str(args.budget), "--threads", threads, "--cache-max-gb", "0"],
                       f"http://127.0.0.1:{front_port}/health")
        clients = {"straight": OpenAI(base_url=f"http://127.0.0.1:{engine_port}/v1", api_key="-", timeout=3600,
                                      max_retries=0),
                   "front": OpenAI(base_url=f"http://127.0.0.1:{front_port}/v1", api_key="-", timeout=3600,
                                   max_retries=0)}
        for i, (seed, name, task) in enumerate(tasks):
            row = {"bench": "front", "models": {"draft": draft, "target": Path(target).name,
                                                "standin": standin},
                   "prompt_tokens_asked": args.tokens, "seed": seed, "task": name, "budget": args.budget,
                   "expected": task.expected, "order": list(WAYS if i % 2 == 0 else reversed(WAYS))}
            for way in row["order"]:
                _ask(clients["straight"], [{"role": "user", "content": "Hi"}], 1)  # empties the engine's prefix
                row[way] = _ask(clients[way], task.messages, task.max_tokens)
                if standin:  # a stand-in's answers are noise: neither kept nor scored
                    del row[way]["answer"]
                else:
                    row[way]["score"] = task.score(row[way]["answer"])
            append_result(out, row)
            print(f"{name:18s} seed {seed} " + " ".join(
                f"{way} ttft {row[way]['ttft_s']:.1f} s score {row[way].get('score', '-')}" for way in WAYS),
                flush=True)
    finally:
        for proc in (front, engine):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    print(summary(out, args.tokens, args.budget))


def summary(path: Path, tokens: int, budget: int) -> str:
    rows = [r for r in read_rows(path) if r["prompt_tokens_asked"] == tokens and r["budget"] == budget]
    lines = []
    for target in sorted({r["models"]["target"] for r in rows}):
        here = [r for r in rows if r["models"]["target"] == target]
        ttft = {way: median(r[way]["ttft_s"] for r in here) for way in WAYS}
        lines.append(f"{target}{' (stand-in: times only)' if here[0]['models']['standin'] else ''}, {tokens} tokens, "
                     f"budget {budget}, {len(here)} prompts: median TTFT straight {ttft['straight']:.1f} s, "
                     f"front {ttft['front']:.1f} s ({ttft['front'] / ttft['straight']:.2f}x)")
        if here[0]["models"]["standin"]:
            continue
        scores = {way: [r[way]["score"] for r in here] for way in WAYS}
        text = " ".join(f"{way} {sum(s) / len(s):.3f}" for way, s in scores.items())
        gap = paired_interval([f - s for f, s in zip(scores["front"], scores["straight"])])
        if gap:
            text += "; front minus straight {:+.3f} [{:+.3f}, {:+.3f}]".format(*gap)
        lines.append("  mean score: " + text)
    return "\n".join(lines) or f"no rows at {tokens} tokens, budget {budget}"


def add_cli_args(p: argparse.ArgumentParser) -> None:
    add_prompt_set_args(p, 8192)
    p.add_argument("--target", help="the engine's GGUF (default: the default target), or a stand-in "
                   "(standin:qwen2.5-7b), timed only")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--out", default="bench/results/front.jsonl")


if __name__ == "__main__":
    script(__doc__, add_cli_args, main, lambda a: summary(Path(a.out), a.tokens, a.budget))
