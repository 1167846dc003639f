"""Which aggregation of per-layer, per-KV-head scores keeps accuracy best when
llama.cpp must keep one token set for all layers and heads.

One draft pass and one target prefill per prompt serve every variant
(`pyspec_gguf.bench.forks`): each variant forks the prompt's KV (shared
cells, no copy), keeps its selection, decodes the last prompt token again
and generates. Accuracy only: no timing is taken.

    python -P studies/aggregation.py --tokens 4096 --samples 4 --budgets 128,256,512

Reproduces bench/README.md, "One token set for all layers and heads: which
aggregation (aggregation.jsonl)".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pyspec_gguf import registry, selection
from pyspec_gguf.bench.common import append_result
from pyspec_gguf.bench.forks import PromptForks
from pyspec_gguf.bench.tasks import single_needle
from pyspec_gguf.session import SpecSession

WINDOW, KERNEL = 32, 7
QUESTION = 48  # tokens before the template's tail that are always kept: the question


def aggregate(raw: np.ndarray, how: str, budget: int) -> np.ndarray:
    """[layer, kv_head, key] -> [key]. 'votes': how many (layer, head) pairs
    put the key in their own top `budget` (ties by the max score)."""
    if how == "max":
        return raw.max(axis=(0, 1))
    if how == "sum":
        return raw.sum(axis=(0, 1))
    pooled = np.stack([[selection.pool1d(h, KERNEL) for h in layer] for layer in raw])
    top = np.argsort(-pooled, axis=2, kind="stable")[..., :budget]
    votes = np.zeros(raw.shape[2])
    np.add.at(votes, top.reshape(-1), 1)
    return votes + raw.max(axis=(0, 1)) / (raw.max() + 1e-9)  # max score only breaks ties


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--budgets", default="128,256,512")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--out", default="bench/results/aggregation.jsonl")


def main(args) -> None:
    budgets = [int(b) for b in args.budgets.split(",")]
    models = {"draft": registry.default_model("draft"), "target": registry.default_model("target")}
    with SpecSession(progress=False) as s:
        for seed in range(args.samples):
            task = single_needle(s.target, args.tokens, seed)
            tail = s.template_tail(task.messages, s.tokenize(task.messages))
            tokens, protected = s.prompt_positions(task.messages, protect_last=tail + QUESTION)
            n = len(tokens)
            forks = PromptForks(s, tokens, protected, args.max_tokens, variants=("snapkv", "speckv"),
                                options={m: {"window": WINDOW, "kernel": KERNEL} for m in ("snapkv", "speckv")})
            protected = protected[protected < n - 1]
            try:
                full, _ = forks.answer_kept(forks.methods["snapkv"], np.arange(n - 1, dtype=np.int32))
                append_result(Path(args.out), {"bench": "aggregation", "models": models, "seed": seed,
                                               "prompt_tokens": n, "variant": "full", "budget": n,
                                               "answer": full, "score": task.score(full)})
                for budget in budgets:
                    for method in ("snapkv", "speckv"):
                        for how in ("max", "sum", "votes"):
                            raw = forks.raw_scores(forks.methods[method])
                            keep = selection.select_topk(aggregate(raw, how, budget), budget, WINDOW, KERNEL,
                                                         protected=protected)
                            text, _ = forks.answer_kept(forks.methods[method], keep)
                            row = {"bench": "aggregation", "models": models, "seed": seed, "prompt_tokens": n,
                                   "variant": f"{method}@{how}", "budget": budget, "answer": text,
                                   "score": task.score(text)}
                            append_result(Path(args.out), row)
                            print(f"seed {seed} budget {budget:4d} {row['variant']:12s} score {row['score']:.0f} "
                                  f"{text.strip()[:40]!r}", flush=True)
            finally:
                forks.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    main(parser.parse_args())
