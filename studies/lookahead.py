"""How far SpecPC's draft should look ahead: accuracy of `specpc` with
lookahead 1 (the paper's default: the prompt's last queries only), 16 and
64, beside `speckv_pc` (whose prompt stage drafts 64), on the benchmark's
tasks, and what the drafted steps cost.

    python -P studies/lookahead.py --tokens 8192 --samples 3 --budgets 1024

One draft pass per prompt serves every variant
(`pyspec_gguf.bench.forks`): the draft drafts the longest lookahead once,
capturing each step's attention, and a shorter lookahead reads the first
steps (greedy drafting is deterministic). The draft's prefill and
lookahead seconds are recorded per prompt, so a variant's draft cost is the
prefill plus its share of the steps. Rows are appended as they come; the
same command later skips what is done. The summary gives each variant's
mean score and its paired difference from lookahead 1 with a 95% interval
(paired standard error over prompts).

Reproduces bench/README.md, "How far SpecPC looks ahead (lookahead.jsonl)".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pyspec_gguf import registry
from pyspec_gguf.bench.common import append_result, paired_interval, script
from pyspec_gguf.bench.forks import PromptForks
from pyspec_gguf.bench.tasks import TASKS, make_task
from pyspec_gguf.methods import make_method
from pyspec_gguf.session import SpecSession

LOOKAHEADS = (1, 16, 64)


def variants(lookaheads, with_full: bool) -> dict:
    methods = {f"specpc@la{k}": make_method("specpc", lookahead=k) for k in lookaheads}
    methods["speckv_pc"] = make_method("speckv_pc")
    if with_full:
        methods["full"] = make_method("full")
    return methods


def _done(path: Path) -> set:
    if not path.exists():
        return set()
    done = set()
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        done.add((r["prompt_tokens_asked"], r["seed"], r["task"], r["variant"], r["budget"]))
    return done


def main(args) -> None:
    out = Path(args.out)
    budgets = [int(b) for b in args.budgets.split(",")]
    lookaheads = [int(k) for k in args.lookaheads.split(",")]
    models = {"draft": registry.default_model("draft"), "target": registry.default_model("target")}
    with SpecSession(progress=False, n_threads=args.threads) as s:
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else range(args.samples)
        for seed in seeds:
            for name in args.tasks.split(","):
                methods = variants(lookaheads, args.full)
                done = _done(out)
                todo = [(v, b) for v in methods for b in budgets
                        if (args.tokens, seed, name, v, b) not in done]
                if not todo:
                    continue
                task = make_task(name, s.target, args.tokens, seed)
                tokens, protected = s.prompt_positions(task.messages)
                forks = PromptForks(s, tokens, protected, task.max_tokens, variants=methods)
                try:
                    for variant, budget in todo:
                        text, cells, _ = forks.answer(variant, budget)
                        times = forks.analysis.clock.times
                        row = {"bench": "lookahead", "models": models, "prompt_tokens_asked": args.tokens,
                               "seed": seed, "task": name, "prompt_tokens": len(tokens), "variant": variant,
                               "budget": budget, "answer": text, "score": task.score(text),
                               "expected": task.expected, "kv_cells": cells,
                               "draft_prefill_s": times["draft_prefill"], "lookahead_s": times["lookahead"],
                               "lookahead_steps": max(lookaheads) - 1}
                        append_result(out, row)
                        print(f"{name:18s} seed {seed} {variant:12s} {budget:5d} score {row['score']:.2f} "
                              f"{text.strip()[:50]!r}", flush=True)
                finally:
                    forks.close()
    print(summary(out, args.tokens))


def summary(path: Path, tokens: int) -> str:
    """Mean score per (variant, budget) and the paired difference from
    lookahead 1 over the prompts both answered."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["prompt_tokens_asked"] == tokens]
    score = {(r["variant"], r["budget"], r["seed"], r["task"]): r["score"] for r in rows}
    lines = [f"{tokens} tokens: variant, budget, prompts, mean score, difference from specpc@la1 (95% interval)"]
    for variant, budget in sorted({(v, b) for v, b, _, _ in score}):
        keys = [(s, t) for v, b, s, t in score if (v, b) == (variant, budget)]
        mean = sum(score[(variant, budget, *k)] for k in keys) / len(keys)
        diffs = [score[(variant, budget, *k)] - score[("specpc@la1", budget, *k)] for k in keys
                 if ("specpc@la1", budget, *k) in score]
        text = f"{variant:12s} {budget:5d} {len(keys):3d} {mean:.3f}"
        gap = paired_interval(diffs)
        if gap and variant != "specpc@la1":
            text += "  {:+.3f} [{:+.3f}, {:+.3f}]".format(*gap)
        lines.append(text)
    return "\n".join(lines)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--seeds", help="comma-separated seeds instead of 0..samples-1 (to split a run across processes)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--budgets", default="1024")
    p.add_argument("--lookaheads", default=",".join(map(str, LOOKAHEADS)))
    p.add_argument("--full", action="store_true", help="also answer with `full` (a whole target prefill per prompt)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="bench/results/lookahead.jsonl")


if __name__ == "__main__":
    script(__doc__, add_cli_args, main, lambda a: summary(Path(a.out), a.tokens))
