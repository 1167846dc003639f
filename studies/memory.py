"""Memory of a long-context pass with flash attention off and on: the
compute buffers llama.cpp allocates for a context, the KV cache, and (with
--prefill) the process's peak RSS over a real captured prefill.

    python -P studies/memory.py --n-ctx 32768 --models draft,target
    python -P studies/memory.py --n-ctx 32768 --models draft --prefill 32000 --threads 1
    python -P studies/memory.py --n-ctx 32768 --models draft --prefill 32000 --threads 1 --flash on

Flash attention off, llama.cpp materialises each layer's attention scores
(n_ubatch × n_ctx × heads), which is what the softmax capture reads; on, it
does not, and the capture computes only the observation rows. Each
measurement runs in a process of its own, so its peak RSS is its alone.

Reproduces bench/README.md, "Flash attention on: capture agreement and memory
(flash_capture.jsonl, memory.jsonl)".
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from pyspec_gguf import registry
from pyspec_gguf.bench.common import append_result, read_rows, script

BUFFER = re.compile(r"(\S+) compute buffer size = +([\d.]+) MiB")


def add_cli_args(p) -> None:
    p.add_argument("--n-ctx", type=int, default=32768)
    p.add_argument("--models", default="draft,target", help="registry roles or model specs, comma-separated")
    p.add_argument("--prefill", type=int, default=0, help="prefill this many prompt tokens with capture armed")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--flash", default="off,on", help="flash attention settings to measure, comma-separated")
    p.add_argument("--out", default="bench/results/memory.jsonl")
    # one measurement, in the process the others start
    p.add_argument("--one", nargs=2, metavar=("MODEL", "FLASH"), help=argparse.SUPPRESS)


def measure_one(spec: str, flash: str, n_ctx: int, prefill: int, threads: int) -> dict:
    """In this process: load, make a context, optionally prefill with the
    SpecPC-style capture armed (last 64 queries, every layer)."""
    from pyspec_gguf import set_verbose
    from pyspec_gguf.engine import Model
    from pyspec_gguf.bench.haystack import fit_tokens
    from pyspec_gguf.session import peak_rss

    # llama.cpp logs its compute buffers' sizes as it makes a context
    lines = []
    logger = logging.getLogger("pyspec_gguf")
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    set_verbose(True)
    with Model(spec, progress=False) as model:
        rss_loaded = peak_rss()
        with model.context(n_ctx=n_ctx, n_threads=threads, flash_attn=flash) as ctx:
            row = {"n_ctx": n_ctx, "flash_attn": flash, "model": Path(model.path).name,
                   "compute_buffers_mib": {m.group(1): float(m.group(2)) for line in lines
                                           for m in [BUFFER.search(line)] if m},
                   "kv_bytes_allocated": ctx.kv_bytes_allocated, "peak_rss_after_load": rss_loaded,
                   "peak_rss_after_context": peak_rss()}
            if prefill:
                tokens = model.tokenize(fit_tokens(model, prefill + 64))[:prefill]
                n = len(tokens)
                ctx.capture_arm(np.arange(model.n_layer, dtype=np.int32), np.arange(n - 64, n, dtype=np.int32),
                                None, "max")
                t = time.perf_counter()
                ctx.prefill(tokens)
                row["prefill_s"] = time.perf_counter() - t
                ctx.capture_take()
                row["prefill_tokens"] = n
                row["peak_rss"] = peak_rss()
    return row


def main(args) -> None:
    if args.one:
        print(json.dumps(measure_one(args.one[0], args.one[1], args.n_ctx, args.prefill, args.threads)))
        return
    flashes = args.flash.split(",")
    if not set(flashes) <= {"off", "on", "auto"}:
        raise SystemExit(f"--flash takes off, on or auto, comma-separated; got {args.flash!r}")
    for spec in args.models.split(","):
        spec = registry.default_model(spec) if spec in ("draft", "target") else spec
        for flash in flashes:
            cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--one", spec, flash, "--n-ctx",
                   str(args.n_ctx), "--prefill", str(args.prefill), "--threads", str(args.threads)]
            with tempfile.TemporaryDirectory(prefix="pyspec-bench-") as cwd:
                done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            append_result(Path(args.out), {"bench": "memory", **row, "threads": args.threads})
            print(json.dumps(row))


def summary(args) -> str:
    rows = read_rows(Path(args.out))
    lines = ["| model | n_ctx | flash attention | compute buffers MiB | KV MiB | prefill tokens | prefill s | "
             "peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        buffers = ", ".join(f"{k} {v:.0f}" for k, v in r["compute_buffers_mib"].items())
        prefill = f"{r['prefill_tokens']} | {r['prefill_s']:.0f}" if "prefill_s" in r else "— | —"
        rss = r.get("peak_rss", r["peak_rss_after_context"])
        lines.append(f"| {r['model']} | {r['n_ctx']} | {r['flash_attn']} | {buffers} | "
                     f"{r['kv_bytes_allocated'] / 2**20:.0f} | {prefill} | {rss / 2**20:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    script(__doc__, add_cli_args, main, summary)
