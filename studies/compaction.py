"""KV memory before and after compaction: prefill a long prompt in the
target, keep a budget of positions, compact into a context sized for it.

    python -P studies/compaction.py --tokens 4096 --budget 1024

Reproduces bench/README.md, "KV memory before and after compaction
(compaction.jsonl)".
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np

from pyspec_gguf import registry
from pyspec_gguf.bench import haystack
from pyspec_gguf.bench.common import append_result
from pyspec_gguf.engine import Model


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model spec (default: the registry's target)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="bench/results/compaction.jsonl")


def main(args) -> dict:
    spec = args.model or registry.default_model("target")
    with Model(spec) as model:
        tokens = model.tokenize(haystack.fit_tokens(model, args.tokens))
        n = len(tokens)
        ctx = model.context(n_ctx=n + 16, n_threads=args.threads)
        ctx.prefill(tokens[:-1], want="none")
        before = {"kv_bytes": ctx.kv_bytes(), "kv_bytes_allocated": ctx.kv_bytes_allocated,
                  "state_bytes": len(ctx.state_get()), "cells": ctx.n_cells(), "rss_bytes": rss_bytes()}
        # which positions are kept does not change the bytes: sink + recent
        keep = np.r_[0:4, n - 1 - (args.budget - 4):n - 1].astype(np.int32)
        t0 = time.perf_counter()
        ctx.seq_keep_positions(0, keep)
        ctx.compact(0, n_ctx=args.budget + 256)
        t_compact = time.perf_counter() - t0
        after = {"kv_bytes": ctx.kv_bytes(), "kv_bytes_allocated": ctx.kv_bytes_allocated,
                 "state_bytes": len(ctx.state_get()), "cells": ctx.n_cells(), "rss_bytes": rss_bytes()}
        ctx.prefill(tokens[-1:])
        answer = model.detokenize(list(ctx.generate(8)))
        row = {"bench": "compaction", "model": Path(model.path).name, "prompt_tokens": n, "budget": args.budget,
               "before": before, "after": after, "compact_s": t_compact,
               "kv_ratio": after["kv_bytes"] / before["kv_bytes"],
               "allocated_ratio": after["kv_bytes_allocated"] / before["kv_bytes_allocated"],
               "generated_after": answer}
    append_result(Path(args.out), row)
    mib = 2 ** 20
    print(f"{n} tokens -> {len(keep)} kept: KV in use {before['kv_bytes'] / mib:.1f} -> {after['kv_bytes'] / mib:.1f} MiB "
          f"({row['kv_ratio']:.3f}x), allocated {before['kv_bytes_allocated'] / mib:.1f} -> "
          f"{after['kv_bytes_allocated'] / mib:.1f} MiB, RSS {before['rss_bytes'] / mib:.0f} -> "
          f"{after['rss_bytes'] / mib:.0f} MiB, compaction {t_compact * 1000:.0f} ms")
    return row


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    main(parser.parse_args())
