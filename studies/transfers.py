"""What a request copies between llama.cpp's buffers and the host, by
method and by where the flash-attention capture scores: on a GPU build
with the KV cache offloaded every such copy crosses the bus, so these are
the host<->device bytes of one answer. The counts do not depend on the
backend (the same native calls run on the CPU build), so the CPU build
measures them: `host`, the capture reading each captured layer's keys to
the host (what a GPU build did before), against `graph`, the capture's
softmax and reductions run where the keys are (what it does now).

    python -P studies/transfers.py --tokens 8192

One benchmark prompt (niah_single, seed 0), flash attention on, budget
1024, a short answer; `Stats.transfers` of each (method, scoring).

Reproduces bench/README.md, "What a request moves to the host
(transfers.jsonl)".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pyspec_gguf import passes, registry
from pyspec_gguf.bench.common import append_result, read_rows, script
from pyspec_gguf.bench.tasks import make_task
from pyspec_gguf.session import SpecSession

METHODS = ("full", "specpc", "speckv", "speckv_pc")


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="bench/results/transfers.jsonl")


def main(args) -> None:
    out = Path(args.out)
    models = {"draft": registry.default_model("draft"), "target": registry.default_model("target")}
    done = {(r["prompt_tokens_asked"], r["method"], r["scoring"]) for r in read_rows(out)}
    with SpecSession(progress=False, n_threads=args.threads, flash_attn="on") as s:
        task = make_task("niah_single", s.target, args.tokens, 0)
        for method in args.methods.split(","):
            # `full` captures nothing: one run tells its figures
            for scoring in ("host", "graph") if method != "full" else ("host",):
                if (args.tokens, method, scoring) in done:
                    continue
                passes.SCORING = scoring
                r = s.generate(task.messages, method, args.budget, max_tokens=8)
                row = {"bench": "transfers", "models": models, "prompt_tokens_asked": args.tokens,
                       "prompt_tokens": r.stats.prompt_tokens, "method": method, "scoring": scoring,
                       "budget": args.budget, "flash_attn": "on", "transfers": r.stats.transfers,
                       "host_bytes": r.stats.host_bytes, "answer": r.text}
                append_result(out, row)
                print(f"{method:10s} {scoring:5s} {r.stats.host_bytes / 2**20:9.1f} MiB  "
                      + "  ".join(f"{k} {c}×/{b / 2**20:.1f} MiB" for k, (c, b) in r.stats.transfers.items()),
                      flush=True)
    passes.SCORING = "auto"


def summary(args) -> str:
    lines = ["| prompt | method | scoring | host bytes | state reads | state writes | capture reads |",
             "|---|---|---|---|---|---|---|"]
    for r in read_rows(Path(args.out)):
        t = r["transfers"]
        lines.append(f"| {r['prompt_tokens']} | {r['method']} | {r['scoring']} | {r['host_bytes'] / 2**20:.2f} MiB | "
                     f"{t['state_read'][0]} ({t['state_read'][1] / 2**20:.1f} MiB) | "
                     f"{t['state_write'][0]} ({t['state_write'][1] / 2**20:.1f} MiB) | "
                     f"{t['capture_read'][0]} ({t['capture_read'][1] / 2**20:.2f} MiB) |")
    return "\n".join(lines)


if __name__ == "__main__":
    script(__doc__, add_cli_args, main, summary)
