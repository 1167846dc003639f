"""Which draft for which engine: a draft of another family compressing
for the target, against the target's own family's draft, as
`serve --upstream` would use them. On the benchmark's tasks, each prompt
is compressed by SpecPC twice, by the default draft (Qwen2.5-Coder 0.5B,
the target's tokenizer) and by `--draft` (SmolLM2-135M by default, another
tokenizer: only the kept text passes between them), and the target answers
each compressed prompt through `full`, as an upstream engine would.

    python -P studies/cross_family.py --tokens 4096 --samples 5

Rows are appended as they come; the same command later skips what is
done. The summary gives each draft's mean score, the paired difference
(cross-family minus same-family) with a 95% interval, the prompt tokens
the target read and the draft's time.

Reproduces bench/README.md, "Which draft for which engine (cross_family.jsonl)".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pyspec_gguf import registry
from pyspec_gguf.bench.common import (add_prompt_set_args, append_result, paired_interval, read_rows, script,
                                      seeds_of)
from pyspec_gguf.bench.tasks import make_task
from pyspec_gguf.session import SpecSession

WAYS = ("same_family", "cross_family")


def _done(path: Path, draft: str) -> set:
    return {(r["prompt_tokens_asked"], r["seed"], r["task"], r["budget"]) for r in read_rows(path)
            if r["models"]["cross_family_draft"] == draft}


def main(args) -> None:
    out = Path(args.out)
    models = {"target": registry.default_model("target"), "same_family_draft": registry.default_model("draft"),
              "cross_family_draft": args.draft}
    seeds = seeds_of(args)
    with SpecSession(progress=False, n_threads=args.threads) as pair, \
            SpecSession(draft=args.draft, target=args.draft, progress=False, n_threads=args.threads) as other:
        drafts = {"same_family": pair, "cross_family": other}
        for seed in seeds:
            for name in args.tasks.split(","):
                if (args.tokens, seed, name, args.budget) in _done(out, args.draft):
                    continue
                task = make_task(name, pair.target, args.tokens, seed)  # the target's tokens, as the benchmark
                row = {"bench": "cross_family", "models": models, "prompt_tokens_asked": args.tokens,
                       "seed": seed, "task": name, "budget": args.budget, "expected": task.expected}
                for way in WAYS:
                    short = drafts[way].compress(task.messages, args.budget, "specpc")
                    r = pair.generate(short.messages, "full", max_tokens=task.max_tokens)
                    row[way] = {"answer": r.text, "score": task.score(r.text),
                                "draft_prompt_tokens": short.prompt_tokens, "kept_draft_tokens": short.kept_tokens,
                                "target_prompt_tokens": r.stats.prompt_tokens,
                                "draft_s": round(sum(short.times.values()), 3)}
                append_result(out, row)
                print(f"{name:18s} seed {seed} " + " ".join(
                    f"{way} {row[way]['score']:.2f} ({row[way]['target_prompt_tokens']} tok, "
                    f"{row[way]['draft_s']:.1f} s)" for way in WAYS), flush=True)
    print(summary(out, args.tokens, args.budget, args.draft))


def summary(path: Path, tokens: int, budget: int, draft: str) -> str:
    rows = [r for r in read_rows(path) if r["prompt_tokens_asked"] == tokens and r["budget"] == budget
            and r["models"]["cross_family_draft"] == draft]
    if not rows:
        return f"no rows at {tokens} tokens, budget {budget}, draft {draft}"
    n = len(rows)
    lines = [f"{tokens} tokens, budget {budget}, {n} prompts, target {rows[0]['models']['target']}: "
             "mean score; prompt tokens the target read; the draft's compress time (median)"]
    for way in WAYS:
        scores = [r[way]["score"] for r in rows]
        read = sum(r[way]["target_prompt_tokens"] for r in rows) / n
        times = sorted(r[way]["draft_s"] for r in rows)
        lines.append(f"{way:12s} {rows[0]['models'][way + '_draft']:40s} {sum(scores) / n:.3f}  "
                     f"{read:.0f} tok  {times[n // 2]:.1f} s")
    gap = paired_interval([r["cross_family"]["score"] - r["same_family"]["score"] for r in rows])
    if gap:
        lines.append("cross minus same family: {:+.3f} [{:+.3f}, {:+.3f}]".format(*gap))
    return "\n".join(lines)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", default="smollm2-135m-instruct-q4_1", help="the draft of another family")
    add_prompt_set_args(p, 4096)
    p.add_argument("--out", default="bench/results/cross_family.jsonl")


if __name__ == "__main__":
    script(__doc__, add_cli_args, main, lambda a: summary(Path(a.out), a.tokens, a.budget, a.draft))
