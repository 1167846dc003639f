"""Attention capture with flash attention on against the softmax path: the
same methods' scores and kept sets on the same prompts, and what each costs.

    python -P studies/flash.py --tokens 8192 --methods specpc --threads 1

With flash attention off, llama.cpp computes each layer's softmax and the
capture reads the observation rows from it; with it on, the capture scores
the observation rows itself from the post-RoPE queries and the layer's
cached keys. Both sessions are loaded side by side and each prompt goes
through both; a row per (prompt, method) gives the Spearman correlation of
the method's final scores over the prompt and the overlap of the kept sets
at each budget, with the time of each pass. Rows are appended as they come;
the same command later skips what is done.

Reproduces bench/README.md, "Flash attention on: capture agreement and memory
(flash_capture.jsonl, memory.jsonl)".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pyspec_gguf.bench.common import append_result, read_rows, script
from pyspec_gguf.bench.tasks import TASKS, make_task
from pyspec_gguf.methods import make_method
from pyspec_gguf.pipeline import Analysis
from pyspec_gguf.session import SpecSession

SETTINGS = ("off", "on")


def add_cli_args(p) -> None:
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--methods", default="specpc,speckv", help="specpc and/or speckv (scored on the target)")
    p.add_argument("--budgets", default="512,1024")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="bench/results/flash_capture.jsonl")


def rank(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def method_scores(session, method, tokens, protected, max_tokens, budgets) -> dict:
    """The method's final scores over the prompt and its kept positions at
    each budget, from the passes `generate` runs, and their times."""
    analysis = Analysis(session, tokens, protected, max_tokens, [method])
    try:
        n = len(tokens)
        if method.kv_stage is None:
            kept = {}
            for b in budgets:
                positions, scores = analysis.select_prompt(method, b)
                kept[b] = positions
        else:
            kv = method.kv_stage
            tp = analysis.target(np.arange(n, dtype=np.int32), kv.target_needs())
            guard = np.union1d(protected[protected < n - 1], [n - 2]).astype(np.int64)
            scores = kv.score(tp)
            kept = {b: kv.select(scores, b, guard) for b in budgets}
        return {"scores": np.asarray(scores, np.float64), "kept": kept, "times": dict(analysis.clock.times)}
    finally:
        analysis.close()


def _done(path: Path) -> set:
    return {(r["tokens"], r["task"], r["seed"], r["method"]) for r in read_rows(path)}


def main(args) -> None:
    out = Path(args.out)
    methods = args.methods.split(",")
    budgets = [int(b) for b in args.budgets.split(",")]
    sessions = {}
    try:
        for fa in SETTINGS:
            sessions[fa] = SpecSession(n_threads=args.threads, flash_attn=fa, progress=False)
        for seed in [int(s) for s in args.seeds.split(",")]:
            for name in args.tasks.split(","):
                for m in methods:
                    if (args.tokens, name, seed, m) in _done(out):
                        continue
                    s = sessions["off"]
                    task = make_task(name, s.target, args.tokens, seed)
                    tokens, protected = s.prompt_positions(task.messages)
                    got = {fa: method_scores(sessions[fa], make_method(m), tokens, protected, task.max_tokens,
                                             budgets) for fa in SETTINGS}
                    off, on = got["off"], got["on"]
                    append_result(out, {
                        "bench": "flash_capture", "tokens": args.tokens, "task": name, "seed": seed, "method": m,
                        "prompt_tokens": len(tokens), "threads": sessions["off"].context_options["n_threads"],
                        "spearman": spearman(off["scores"], on["scores"]),
                        "overlap": {b: len(np.intersect1d(off["kept"][b], on["kept"][b])) / len(off["kept"][b])
                                    for b in budgets},
                        "times_off": off["times"], "times_on": on["times"]})
    finally:
        for s in sessions.values():
            s.close()


def summary(args) -> str:
    rows = read_rows(Path(args.out))
    lines = ["| tokens | method | prompts | Spearman, min (median) | " +
             " | ".join(f"overlap at {b}, min (median)" for b in args.budgets.split(",")) +
             " | draft prefill s, off → on (median) | target prefill s, off → on (median) |",
             "|---|---|---|---|" + "---|" * len(args.budgets.split(",")) + "---|---|"]
    for key in sorted({(r["tokens"], r["method"]) for r in rows}):
        rs = [r for r in rows if (r["tokens"], r["method"]) == key]
        sp = [r["spearman"] for r in rs]
        cells = [f"{min(r['overlap'][b] for r in rs):.3f} ({np.median([r['overlap'][b] for r in rs]):.3f})"
                 for b in args.budgets.split(",")]

        def t(stage):
            off = np.median([r["times_off"].get(stage, 0) for r in rs])
            on = np.median([r["times_on"].get(stage, 0) for r in rs])
            return f"{off:.1f} → {on:.1f}"
        lines.append(f"| {key[0]} | {key[1]} | {len(rs)} | {min(sp):.4f} ({np.median(sp):.4f}) | "
                     + " | ".join(cells) + f" | {t('draft_prefill')} | {t('target_prefill')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    script(__doc__, add_cli_args, main, summary)
