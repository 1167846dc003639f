"""What a compressed prompt is worth to another engine: on the benchmark's
tasks, the target answering the compressed text through plain `full` (as
llama-server or Ollama would, fed `SpecSession.compress`'s output) against
`specpc` answering the original prompt, and the same with the dropped runs
elided rather than marked.

    python -P studies/compressed.py --tokens 4096 --samples 5

One draft pass per prompt: SpecPC answers the original, and its kept
positions (`Result.kept`, the set `compress` returns) are spelled back into
text (`compress.from_kept`). Rows are appended as they come; the same
command later skips what is done. The summary gives each way's mean score
and its paired difference from specpc with a 95% interval.

Reproduces bench/README.md, "What a compressed prompt is worth to another
engine (compressed.jsonl)".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pyspec_gguf import registry
from pyspec_gguf.bench.common import (add_prompt_set_args, append_result, paired_interval, read_rows, script,
                                      seeds_of)
from pyspec_gguf.bench.tasks import make_task
from pyspec_gguf.compress import from_kept
from pyspec_gguf.session import SpecSession

MARKERS = {"marked": " …", "elided": ""}


def _done(path: Path) -> set:
    return {(r["prompt_tokens_asked"], r["seed"], r["task"], r["budget"]) for r in read_rows(path)}


def main(args) -> None:
    out = Path(args.out)
    models = {"draft": registry.default_model("draft"), "target": registry.default_model("target")}
    seeds = seeds_of(args)
    with SpecSession(progress=False, n_threads=args.threads) as s:
        for seed in seeds:
            for name in args.tasks.split(","):
                if (args.tokens, seed, name, args.budget) in _done(out):
                    continue
                task = make_task(name, s.target, args.tokens, seed)
                spec = s.generate(task.messages, "specpc", args.budget, max_tokens=task.max_tokens)
                row = {"bench": "compressed", "models": models, "prompt_tokens_asked": args.tokens, "seed": seed,
                       "task": name, "budget": args.budget, "prompt_tokens": spec.stats.prompt_tokens,
                       "expected": task.expected, "specpc": {"answer": spec.text, "score": task.score(spec.text)}}
                for way, marker in MARKERS.items():
                    short = from_kept(s, task.messages, spec.prompt_tokens, spec.kept, marker, "specpc")
                    r = s.generate(short.messages, "full", max_tokens=task.max_tokens)
                    row[way] = {"answer": r.text, "score": task.score(r.text),
                                "compressed_tokens": short.compressed_tokens}
                append_result(out, row)
                print(f"{name:18s} seed {seed} specpc {row['specpc']['score']:.2f} marked "
                      f"{row['marked']['score']:.2f} elided {row['elided']['score']:.2f} "
                      f"({row['marked']['compressed_tokens']}/{row['elided']['compressed_tokens']} tok)", flush=True)
    print(summary(out, args.tokens, args.budget))


def summary(path: Path, tokens: int, budget: int) -> str:
    rows = read_rows(path)
    rows = [r for r in rows if r["prompt_tokens_asked"] == tokens and r["budget"] == budget]
    if not rows:
        return f"no rows at {tokens} tokens, budget {budget}"
    lines = [f"{tokens} tokens, budget {budget}, {len(rows)} prompts: mean score; difference from specpc "
             "(95% interval); mean tokens of the compressed prompt"]
    base = [r["specpc"]["score"] for r in rows]
    lines.append(f"specpc (original prompt)     {sum(base) / len(rows):.3f}")
    for way in MARKERS:
        scores = [r[way]["score"] for r in rows]
        gap = paired_interval([a - b for a, b in zip(scores, base)])
        tok = sum(r[way]["compressed_tokens"] for r in rows) / len(rows)
        text = f"full on compressed, {way:7s} {sum(scores) / len(rows):.3f}"
        if gap:
            text += "  {:+.3f} [{:+.3f}, {:+.3f}]".format(*gap)
        lines.append(text + f"  {tok:.0f} tok")
    return "\n".join(lines)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    add_prompt_set_args(p, 4096)
    p.add_argument("--out", default="bench/results/compressed.jsonl")


if __name__ == "__main__":
    script(__doc__, add_cli_args, main, lambda a: summary(Path(a.out), a.tokens, a.budget))
