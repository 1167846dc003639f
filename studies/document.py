"""Chat with one document: per turn, time to first token, accuracy, KV held
and peak RSS of five ways to answer a conversation of questions about it.

    python -P studies/document.py --tokens 8192 --questions 5

cold_full    `generate(method="full")` per turn: everything prefilled every time
warm_full    a Document asked with `full`: the target's KV of the conversation
             cached (as llama.cpp's prompt cache), only new tokens prefilled
cold_specpc  `generate(method="specpc")` per turn
doc_specpc   a Document asked with `specpc` (prompt side)
doc_speckv   a Document asked with `speckv` (KV side)
doc_specpc_kept  a Document asked with `specpc`, its target keeping the KV
             of the document tokens kept so far (`reuse_kept`)
disk         a Document's draft read, its save, and its load in a new Document

The document is the benchmark's haystack (Paul Graham essays) with one magic
number per question hidden at random depths; a turn is right when its answer
holds the number. Each configuration runs in its own process (peak RSS is
the process's own); rows are appended to the output as they come, and the
same command later skips the configurations the file already holds.

With `--target standin:qwen2.5-7b` the target is a stand-in of that model's
shapes (pyspec_gguf/bench/standin.py): its turns are timed, its answers are
noise and are not recorded.

Reproduces bench/README.md, "Chat with one 8K-token document, five questions
(document.jsonl)" and "... on a 7B target (document-7b.jsonl)".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pyspec_gguf.bench.common import append_result
from pyspec_gguf.bench.standin import is_standin, model_path
from pyspec_gguf.bench.tasks import make_conversation
from pyspec_gguf.document import conversation, question_protect
from pyspec_gguf.prefix import common_prefix
from pyspec_gguf.session import SpecSession
from pyspec_gguf.store import read_state

CONFIGS = {  # name: (method, asked through a Document, the Document's reuse_kept)
    "cold_full": ("full", False, False),
    "warm_full": ("full", True, False),
    "cold_specpc": ("specpc", False, False),
    "doc_specpc": ("specpc", True, False),
    "doc_speckv": ("speckv", True, False),
    "doc_specpc_kept": ("specpc", True, True),
    "disk": (None, True, False),
}


def run_config(name: str, args) -> list:
    method, documented, reuse_kept = CONFIGS[name]
    rows = []
    standin = is_standin(args.target)
    with SpecSession(draft=args.draft, target=model_path(args.target), n_threads=args.threads, progress=False) as session:
        text, questions = make_conversation(session.target, args.tokens, args.questions, args.seed)
        base = {"config": name, "tokens": args.tokens, "seed": args.seed, "threads": session.context_options["n_threads"],
                "budget": args.budget, "loadavg": os.getloadavg()[0], "target": args.target, "standin": standin}
        if name == "disk":
            return [_disk(session, text, base)]
        doc = session.document(text, cache=False, read=False, reuse_kept=reuse_kept) if documented else None
        turns, before = [], None
        for i, (question, value) in enumerate(questions):
            t0 = time.perf_counter()
            if doc is not None:
                r = doc.ask(question, method=method, budget=args.budget, max_tokens=args.max_tokens)
                held = doc.kv_bytes
            else:
                r = session.generate(conversation(text, turns, question), method=method, budget=args.budget,
                                     max_tokens=args.max_tokens, protect_last=question_protect(session.target, question))
                turns.append((question, r.text))
                held = {"draft": 0, "target": 0}
            s = r.stats
            kept = r.prompt_tokens[r.kept]
            rows.append({**base, "method": method, "turn": i + 1, "prompt_tokens": s.prompt_tokens,
                         # what a target cache of the last turn's kept tokens could serve: their common
                         # prefix, and the positions kept now that were not kept then
                         "kept_common_prefix": None if before is None else common_prefix(before[1], kept),
                         "kept_new": None if before is None else int(np.setdiff1d(r.kept, before[0]).size),
                         "ttft_s": s.ttft_s, "total_s": time.perf_counter() - t0, "times": s.times,
                         "kept_tokens": s.kept_tokens, "answer_kv_bytes": s.target_kv_bytes,
                         "held_draft_kv_bytes": held["draft"], "held_target_kv_bytes": held["target"],
                         "peak_rss_bytes": s.peak_rss_bytes, "draft_cached": s.draft_cached,
                         "target_cached": s.target_cached,
                         # a stand-in's answers are noise: never scored
                         **({} if standin else {"expected": value, "correct": value in r.text, "answer": r.text})})
            before = (r.kept, kept)
            print(json.dumps(rows[-1]), flush=True, file=sys.stderr)
        if doc is not None:
            doc.close()
    return rows


def _disk(session, text: str, base: dict) -> dict:
    """The draft's read of the document against loading its saved state
    (from the page cache: the file was just written)."""
    with tempfile.TemporaryDirectory() as tmp:
        doc = session.document(text, cache=False)
        path = doc.save(Path(tmp) / "doc.psgdoc")
        t0 = time.perf_counter()
        doc.save(Path(tmp) / "again.psgdoc")
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        read_state(path, doc.prefix, session.draft.sha256())
        check_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        doc.load(path)
        load_s = time.perf_counter() - t0
        row = {**base, "prompt_tokens": len(doc.prefix), "read_s": doc.read_seconds, "save_s": save_s,
               "load_s": load_s, "check_s": check_s, "file_bytes": path.stat().st_size}
        doc.close()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -P studies/document.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--questions", type=int, default=5)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--draft", default="")
    p.add_argument("--target", default=None)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--config", help=argparse.SUPPRESS)  # one configuration, in this process
    p.add_argument("--out", default="bench/results/document.jsonl")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.config:
        for row in run_config(args.config, args):  # a configuration's turns land together
            append_result(out, row)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")
        if any(r["config"] == name and r["tokens"] == args.tokens and r["seed"] == args.seed
               and r.get("target") == args.target for r in _rows(out)):
            print(f"{name}: already in {out}", file=sys.stderr)
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-P", str(Path(__file__).resolve()),
                               *(sys.argv[1:] if argv is None else argv), "--config", name])
        if done.returncode:
            return done.returncode
    print(table(_rows(out), args.tokens, args.seed))
    return 0


def _rows(path: Path) -> list:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line cut short by a stop
    return rows


def _right(row: dict) -> str:
    return "—" if row.get("standin") else "yes" if row["correct"] else "no"


def table(rows: list, tokens: int, seed: int) -> str:
    """Per configuration and turn: time to first token, right or not, KV
    held and peak RSS; then the disk row."""
    rows = [r for r in rows if r["tokens"] == tokens and r["seed"] == seed]
    lines = ["| config | turn | prompt tok | cached draft/target | ttft s | right | answer KV MiB | held KV MiB "
             "(draft+target) | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["config"] == "disk":
            continue
        held = (r["held_draft_kv_bytes"] + r["held_target_kv_bytes"]) / 2**20
        lines.append(f"| {r['config']} | {r['turn']} | {r['prompt_tokens']} | {r['draft_cached']}/{r['target_cached']} "
                     f"| {r['ttft_s']:.1f} | {_right(r)} | {r['answer_kv_bytes'] / 2**20:.0f} "
                     f"| {held:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    for r in rows:
        if r["config"] == "disk":
            lines.append(f"\ndisk: {r['prompt_tokens']} tokens read by the draft in {r['read_s']:.1f} s; saved in "
                         f"{r['save_s']:.2f} s ({r['file_bytes'] / 2**20:.0f} MiB), checked and loaded in "
                         f"{r['load_s']:.2f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
