"""Does a stand-in time as the real model does? The 0.5B-shaped stand-in,
made from the 1.5B target's file (its types, random weights), against the
real 0.5B draft: the same prompt prefilled, and then a few tokens decoded,
by each in turn, interleaved.

    python -P studies/standin_check.py --tokens 2048 --repeats 3

Reproduces bench/README.md, "Stand-in targets: timing a model without its
weights (standin_check.jsonl)".
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from pyspec_gguf import registry
from pyspec_gguf.bench import haystack, standin
from pyspec_gguf.bench.common import append_result, summary
from pyspec_gguf.engine import Model


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=2048, help="prompt length")
    p.add_argument("--decode", type=int, default=32, help="tokens decoded after the prompt")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--flash-attn", choices=["off", "on", "auto"], default="auto")
    p.add_argument("--out", default="bench/results/standin_check.jsonl")


def timed(path: str, tokens: np.ndarray, args) -> tuple:
    """(prefill s, decode tokens/s) of one model in a fresh context."""
    with Model(path, progress=False) as model, \
            model.context(n_ctx=len(tokens) + args.decode + 16, n_threads=args.threads,
                          flash_attn=args.flash_attn) as ctx:
        t0 = time.perf_counter()
        ctx.prefill(tokens)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = sum(1 for _ in ctx.generate(args.decode))
        return prefill, n / (time.perf_counter() - t0)


def main(args) -> dict:
    real = registry.resolve(registry.default_model("draft"))
    stand_in = standin.standin_target(registry.resolve(registry.default_model("target")), "qwen2.5-0.5b")
    with Model(str(real), progress=False) as model:
        tokens = model.tokenize(haystack.fit_tokens(model, args.tokens))
    runs = {"real": [], "standin": []}
    timed(str(real), tokens[:64], args)  # warm-up: page in the weights
    timed(str(stand_in), tokens[:64], args)
    for i in range(args.repeats):
        for name in (("real", "standin") if i % 2 == 0 else ("standin", "real")):
            runs[name].append(timed(str(real if name == "real" else stand_in), tokens, args))
            print(f"run {i + 1}/{args.repeats} {name}: prefill {runs[name][-1][0]:.2f} s, "
                  f"decode {runs[name][-1][1]:.1f} tok/s", flush=True)
    prefill = {k: [p for p, _ in v] for k, v in runs.items()}
    decode = {k: [d for _, d in v] for k, v in runs.items()}
    row = {"bench": "standin_check", "real": real.name, "standin": stand_in.name,
           "real_bytes": real.stat().st_size, "standin_bytes": stand_in.stat().st_size,
           "prompt_tokens": len(tokens), "flash_attn": args.flash_attn, "threads": args.threads,
           "prefill_real_s": summary(prefill["real"]), "prefill_standin_s": summary(prefill["standin"]),
           "prefill_ratio": float(np.median(prefill["standin"]) / np.median(prefill["real"])),
           "decode_real_tok_s": summary(decode["real"]), "decode_standin_tok_s": summary(decode["standin"]),
           "decode_ratio": float(np.median(decode["standin"]) / np.median(decode["real"]))}
    append_result(Path(args.out), row)
    print(f"{len(tokens)} tokens: stand-in / real prefill {row['prefill_ratio']:.3f}, "
          f"decode speed {row['decode_ratio']:.3f} (medians of {args.repeats})")
    return row


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    main(parser.parse_args())
