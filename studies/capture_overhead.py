"""Cost of attention capture: the draft's prefill of a long prompt with
capture armed for the last W queries (SpecPC's setting) against the same
prefill with capture not armed, alternated in one run.

    python -P studies/capture_overhead.py --tokens 4096 --repeats 3

Reproduces bench/README.md, "Attention capture overhead
(capture_overhead.jsonl)".
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from pyspec_gguf import registry
from pyspec_gguf.bench import haystack
from pyspec_gguf.bench.common import append_result, summary
from pyspec_gguf.engine import Model
from pyspec_gguf.passes import Clock, DraftNeeds, draft_pass


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model spec (default: the registry's draft)")
    p.add_argument("--tokens", type=int, default=4096, help="prompt length")
    p.add_argument("--window", type=int, default=64, help="observation queries (the last W)")
    p.add_argument("--start-layer", type=int, default=8, help="first captured layer")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--flash-attn", choices=["off", "on"], default="off",
                   help="on: capture scores the rows from the queries and cached keys")
    p.add_argument("--out", default="bench/results/capture_overhead.jsonl")


def main(args) -> dict:
    spec = args.model or registry.default_model("draft")
    with Model(spec) as model:
        tokens = model.tokenize(haystack.fit_tokens(model, args.tokens))
        n = len(tokens)
        layers = np.arange(args.start_layer, model.n_layer, dtype=np.int32)
        options = {"n_threads": args.threads, "flash_attn": args.flash_attn}

        def prefill(armed: bool) -> float:
            """The draft pass, capturing SpecPC's rows or nothing; seconds of its prefill."""
            needs = DraftNeeds(window=args.window, weighted=True, start_layer=args.start_layer) if armed \
                else DraftNeeds()
            clock, c0 = Clock(), time.process_time()
            done = draft_pass(model, tokens, needs, options, clock, room=1)  # room: keep the context to read
            dc = time.process_time() - c0
            if armed:
                reduce_s.append(done.context.capture_seconds)
            done.context.close()
            (cpu_armed if armed else cpu_plain).append(dc)
            return clock.times["draft_prefill"]

        cpu_plain, cpu_armed, reduce_s = [], [], []
        prefill(False)  # warm-up: page in the weights
        cpu_plain.clear()
        plain, armed = [], []
        for i in range(args.repeats):
            for is_armed in ((False, True) if i % 2 == 0 else (True, False)):
                (armed if is_armed else plain).append(prefill(is_armed))
                print(f"run {i + 1}/{args.repeats} {'armed' if is_armed else 'plain'}: "
                      f"{(armed if is_armed else plain)[-1]:.2f} s", flush=True)
        row = {
            "bench": "capture_overhead", "model": Path(model.path).name, "prompt_tokens": n,
            "flash_attn": args.flash_attn, "threads": args.threads,
            "window": args.window, "layers": [int(layers[0]), int(layers[-1])],
            "prefill_plain_s": summary(plain), "prefill_armed_s": summary(armed),
            "overhead": float(np.median(armed) / np.median(plain) - 1),
            "paired_overhead": [a / p - 1 for a, p in zip(armed, plain)],
            "cpu_plain_s": summary(cpu_plain), "cpu_armed_s": summary(cpu_armed),
            "cpu_overhead": float(np.median(cpu_armed) / np.median(cpu_plain) - 1),
            "callback_reduce_s": summary(reduce_s),
            "callback_share": float(np.median(reduce_s) / np.median(plain)),
        }
    append_result(Path(args.out), row)
    print(f"prompt {n} tokens: plain {np.median(plain):.2f} s, armed {np.median(armed):.2f} s, "
          f"overhead {row['overhead'] * 100:+.1f}% wall, {row['cpu_overhead'] * 100:+.1f}% CPU time "
          f"(median of {args.repeats}); reading and reducing rows in the callback: "
          f"{np.median(reduce_s) * 1000:.0f} ms ({row['callback_share'] * 100:.2f}% of the prefill)")
    return row


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    main(parser.parse_args())
