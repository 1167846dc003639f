"""Time to first token and target KV memory of the draft-guided methods
against the full context, side by side in one run, on needle prompts.

For SpecPC it also measures its floor: the draft's plain prefill of the
prompt plus the target's prefill of the kept tokens, each alone.

    python -m pyspec_gguf.bench.ttft --tokens 8192 --budget 1024 --samples 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from .. import registry
from ..session import SpecSession
from .common import append_result
from .tasks import single_needle


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--methods", default="full,specpc,speckv")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="bench/results/ttft.jsonl")


def floor(session, tokens, kept) -> dict:
    """SpecPC's floor: plain draft prefill of the prompt + target prefill of the kept tokens."""
    out = {}
    for name, model, toks in (("draft_prefill_s", session.draft, tokens), ("target_prefill_s", session.target,
                                                                          tokens[kept])):
        with model.context(n_ctx=len(toks) + 8, **session.context_options) as ctx:
            t0 = time.perf_counter()
            ctx.prefill(toks)
            out[name] = time.perf_counter() - t0
    out["floor_s"] = out["draft_prefill_s"] + out["target_prefill_s"]
    return out


def main(args) -> list:
    methods = args.methods.split(",")
    out = Path(args.out)
    rows = []
    with SpecSession(n_threads=args.threads, progress=False) as session:
        models = {"draft": registry.default_model("draft"), "target": registry.default_model("target")}
        for seed in range(args.samples):
            task = single_needle(session.target, args.tokens, seed)
            specpc_kept = None
            for method in methods:
                r = session.generate(task.messages, method=method, budget=args.budget, max_tokens=args.max_tokens,
                                     protect_last=48)
                row = {"bench": "ttft", "models": models, "seed": seed, "method": method, "budget": args.budget,
                       "prompt_tokens": r.stats.prompt_tokens, "kept": r.stats.kept_tokens, "ttft_s": r.stats.ttft_s,
                       "times": r.stats.times, "target_kv_bytes": r.stats.target_kv_bytes,
                       "decode_tok_s": r.stats.decode_tok_s, "answer": r.text, "expected": task.expected,
                       "score": task.score(r.text)}
                if method == "specpc":
                    specpc_kept = r.kept
                append_result(out, row)
                rows.append(row)
                print(f"seed {seed} {method:8s} ttft {r.stats.ttft_s:6.1f} s  kept {r.stats.kept_tokens:5d}  "
                      f"score {row['score']:.0f}  {r.text.strip()[:50]!r}", flush=True)
            if specpc_kept is not None:
                row = {"bench": "ttft", "models": models, "seed": seed, "method": "specpc_floor",
                       "budget": args.budget, **floor(session, session.tokenize(task.messages), specpc_kept)}
                append_result(out, row)
                rows.append(row)
                print(f"seed {seed} floor    {row['floor_s']:6.1f} s (draft {row['draft_prefill_s']:.1f} s + "
                      f"target {row['target_prefill_s']:.1f} s)", flush=True)
    med = {m: statistics.median(r["ttft_s"] for r in rows if r["method"] == m) for m in methods}
    for m in methods:
        print(f"{m}: median ttft {med[m]:.1f} s ({med[m] / med.get('full', med[m]):.2f}x full)")
    floors = [r["floor_s"] for r in rows if r["method"] == "specpc_floor"]
    if floors and "specpc" in med:
        print(f"specpc floor {statistics.median(floors):.1f} s; specpc / floor = "
              f"{med['specpc'] / statistics.median(floors):.2f}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    main(parser.parse_args())
