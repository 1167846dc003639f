"""One KV set for all layers and heads ("token") or one per layer and KV head
("head", by state rewrite): which keeps more accuracy, at which budgets.

One draft pass and one target prefill per prompt serve every variant
(`pyspec_gguf.bench.forks`): a "token" variant forks the prompt's KV and
keeps its set; a "head" variant rewrites the state into a fresh context
sized for the budget. Every variant keeps `budget` entries per head plus
the last token, so the KV bytes are equal; the per-head selection and
rewrite times are recorded.

    python -P studies/granularity.py --tokens 4096 --samples 1 --budgets 64,128,256,512

Reproduces bench/README.md, "One KV set or one per head (granularity.jsonl)".
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from pyspec_gguf import registry
from pyspec_gguf.bench.common import append_result
from pyspec_gguf.bench.forks import PromptForks
from pyspec_gguf.bench.tasks import TASKS, make_task
from pyspec_gguf.scoring import aggregate
from pyspec_gguf.session import SpecSession


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--budgets", default="64,128,256,512")
    p.add_argument("--out", default="bench/results/granularity.jsonl")


def main(args) -> None:
    budgets = [int(b) for b in args.budgets.split(",")]
    models = {"draft": registry.default_model("draft"), "target": registry.default_model("target")}
    out = Path(args.out)
    with SpecSession(progress=False) as s:
        for seed in range(args.samples):
            for name in args.tasks.split(","):
                task = make_task(name, s.target, args.tokens, seed)
                tokens, protected = s.prompt_positions(task.messages)
                n = len(tokens)
                forks = PromptForks(s, tokens, protected, task.max_tokens, variants=("snapkv", "speckv"))
                protected = protected[protected < n - 1]
                base = {"bench": "granularity", "models": models, "seed": seed, "task": name, "prompt_tokens": n,
                        "expected": task.expected}
                try:
                    full, _ = forks.answer_kept(forks.methods["snapkv"], np.arange(n - 1, dtype=np.int32))
                    append_result(out, {**base, "variant": "full", "budget": n, "answer": full,
                                        "score": task.score(full)})
                    print(f"{name:18s} seed {seed} full score {task.score(full):.2f} {full.strip()[:50]!r}",
                          flush=True)
                    for budget in budgets:
                        for method in forks.methods.values():
                            raw = forks.raw_scores(method)
                            t0 = time.perf_counter()
                            per_head = method.select_per_head(raw, budget, protected)
                            select_s = time.perf_counter() - t0
                            one_set = method.select(aggregate(raw, method.aggregation), budget, protected)
                            for gran in ("token", "head"):
                                eviction_s = forks.analysis.clock.times["eviction"]
                                if gran == "token":
                                    text, _ = forks.answer_kept(method, one_set)
                                else:
                                    text, _ = forks.answer_per_head(method, per_head)
                                eviction_s = forks.analysis.clock.times["eviction"] - eviction_s
                                row = {**base, "variant": f"{method.name}@{gran}", "budget": budget,
                                       "answer": text, "score": task.score(text),
                                       "select_s": select_s if gran == "head" else None,
                                       "rewrite_s": eviction_s if gran == "head" else None}
                                append_result(out, row)
                                print(f"{name:18s} seed {seed} budget {budget:4d} {row['variant']:14s} "
                                      f"score {row['score']:.2f} {text.strip()[:50]!r}", flush=True)
                finally:
                    forks.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    main(parser.parse_args())
