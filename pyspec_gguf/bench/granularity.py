"""One KV set for all layers and heads ("token") or one per layer and KV head
("head", by state rewrite): which keeps more accuracy, at which budgets.

One draft pass and one target prefill per prompt serve every variant: the
target's prompt KV stays in sequence 0. A "token" variant copies it to
sequence 1 (shared cells), keeps its selection there, decodes the last
prompt token again and generates; a "head" variant rewrites the state of
sequence 0 into a fresh context sized for the budget and does the same.
Every variant keeps `budget` entries per head plus the last token, so the
KV bytes are equal; the rewrite time is recorded.

    python -m pyspec_gguf.bench.granularity --tokens 4096 --samples 1 --budgets 64,128,256,512
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .. import registry, selection
from ..scoring import greedy_lookahead
from ..session import SpecSession
from .common import append_result
from .tasks import TASKS, make_task

WINDOW, KERNEL = 32, 7


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--budgets", default="64,128,256,512")
    p.add_argument("--lookahead", type=int, default=64)
    p.add_argument("--out", default="bench/results/granularity.jsonl")


def main(args) -> None:
    budgets = [int(b) for b in args.budgets.split(",")]
    models = {"draft": registry.default_model("draft"), "target": registry.default_model("target")}
    out = Path(args.out)
    with SpecSession(progress=False) as s:
        opts = s.context_options
        for seed in range(args.samples):
            for name in args.tasks.split(","):
                task = make_task(name, s.target, args.tokens, seed)
                tokens = s.tokenize(task.messages)
                n = len(tokens)
                max_tokens = task.max_tokens
                protected = s.protected_positions(tokens, s.template_tail(task.messages, tokens))
                protected = protected[protected < n - 1]
                with s.draft.context(n_ctx=n + args.lookahead + 8, **opts) as dctx:
                    dctx.prefill(tokens)
                    lookahead, _ = greedy_lookahead(dctx, s.draft, args.lookahead)
                with s.target.context(n_ctx=n + len(lookahead) + 2 * max_tokens + 16, n_seq_max=2, **opts) as ctx:
                    layers = np.arange(s.target.n_layer, dtype=np.int32)
                    ctx.capture_arm(layers, np.arange(n - WINDOW - 1, n + len(lookahead), dtype=np.int32), None, "max")
                    ctx.prefill(tokens, want="none")
                    window_rows, _ = ctx.capture_take()
                    ctx.prefill(lookahead, want="none")
                    lookahead_rows, _ = ctx.capture_take()
                    ctx.capture_disarm()
                    ctx.seq_rm(0, n - 1, -1)  # seq 0: the prompt's KV but the last token
                    raw = {"snapkv": window_rows[..., : n - 1],
                           "speckv": np.maximum(window_rows[..., : n - 1], lookahead_rows[..., : n - 1])}

                    def generate(c, seq):
                        c.prefill(tokens[-1:], seq=seq)
                        return s.target.detokenize(list(c.generate(max_tokens, seq=seq)))

                    def by_token(keep):
                        ctx.seq_cp(0, 1)
                        ctx.seq_keep_positions(1, keep)
                        text = generate(ctx, 1)
                        ctx.seq_rm(1, -1, -1)
                        return text, 0.0

                    def by_head(keep):
                        c = keep.shape[-1]
                        t0 = time.perf_counter()
                        blob = ctx.state_rewrite(ctx.state_get(0), keep, np.arange(n - 1 - c, n - 1, dtype=np.int32))
                        with s.target.context(n_ctx=c + max_tokens + 16, **opts) as hctx:
                            hctx.load_state(0, blob)
                            seconds = time.perf_counter() - t0
                            return generate(hctx, 0), seconds

                    full, _ = by_token(np.arange(n - 1, dtype=np.int32))
                    base = {"bench": "granularity", "models": models, "seed": seed, "task": name,
                            "prompt_tokens": n, "expected": task.expected}
                    append_result(out, {**base, "variant": "full", "budget": n, "answer": full,
                                        "score": task.score(full)})
                    print(f"{name:18s} seed {seed} full score {task.score(full):.2f} {full.strip()[:50]!r}", flush=True)
                    for budget in budgets:
                        for method, scores in raw.items():
                            t0 = time.perf_counter()
                            per_head = selection.select_topk_per_head(scores, budget, WINDOW, KERNEL,
                                                                      protected=protected)
                            select_s = time.perf_counter() - t0
                            one_set = selection.select_topk(scores.max(axis=(0, 1)), budget, WINDOW, KERNEL,
                                                            protected=protected)
                            for gran, (text, rewrite_s) in (("token", by_token(one_set)),
                                                            ("head", by_head(per_head))):
                                row = {**base, "variant": f"{method}@{gran}", "budget": budget, "answer": text,
                                       "score": task.score(text), "select_s": select_s if gran == "head" else None,
                                       "rewrite_s": rewrite_s if gran == "head" else None}
                                append_result(out, row)
                                print(f"{name:18s} seed {seed} budget {budget:4d} {row['variant']:14s} "
                                      f"score {row['score']:.2f} {text.strip()[:50]!r}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    main(parser.parse_args())
