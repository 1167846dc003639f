"""Every path that moves a KV cache, timed where the cache lives: with the
KV in device memory (a GPU build, or Vulkan's lavapipe here) a path that
reads the state one row or cell range at a time costs a queue submit per
read, so its seconds and its copies (`Stats.transfers`) show whether it
moves the KV once each way.

    GGML_VK_VISIBLE_DEVICES=0 python -P studies/device_paths.py --tokens 4096,8192

One model is both draft and target (default SmolLM2-135M: 23 KiB of KV a
token, about the 1.5B target's 28 KiB), every layer offloaded, for each
prompt length and flash-attention setting:

generate_speckv        SpecKV, one set of entries, evicted in place
generate_speckv_head   SpecKV per KV head, the state rewritten in place
ask_speckv             a document chat, 1st question: SpecKV, the kept
                       entries copied out of the document's cached KV
ask_speckv_head        2nd question: per head, from the same cache
ask_specpc_kept        3rd question: SpecPC, the target keeping the KV of
                       the kept tokens (`reuse_kept`)
save / load            the draft's state of the document to a file and back
snapshot               the prefix cache's state of all but its last tokens
                       (what the server's draft cache writes to disk)
grow                   the prefix cache moved into a larger context

A row per (tokens, flash, path): seconds (the eviction stage for the
answers, the call for the rest), time to first token for the answers, and
the copies by kind. Rows are appended as they come.

Reproduces bench/README.md, "Every KV path on a device (device_paths.jsonl)".
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from pyspec_gguf.bench.common import append_result, read_rows, script
from pyspec_gguf.bench.tasks import make_conversation
from pyspec_gguf.engine import transfers, transfers_since
from pyspec_gguf.session import SpecSession

QUESTIONS = (("ask_speckv", "speckv", {}), ("ask_speckv_head", "speckv", {"granularity": "head"}),
             ("ask_specpc_kept", "specpc", {}))
ALL_PATHS = {"generate_speckv", "generate_speckv_head", *(q[0] for q in QUESTIONS), "save", "load", "snapshot",
             "grow"}


@contextmanager
def _measured(row: dict):
    """Fills row's seconds and transfers with what the block took."""
    t0, before = time.perf_counter(), transfers()
    yield
    row["seconds"], row["transfers"] = time.perf_counter() - t0, transfers_since(before)


def _answer_row(path: str, result) -> dict:
    s = result.stats
    return {"path": path, "seconds": s.times["eviction"], "ttft_s": s.ttft_s, "transfers": s.transfers,
            "prompt_tokens": s.prompt_tokens, "answer": result.text}


def paths(session: SpecSession, tokens: int, args, done: set):
    """A row for each path at a prompt of `tokens` tokens; the generate
    paths in `done` are skipped (the document's run together)."""
    text, questions = make_conversation(session.target, tokens, 3, seed=0)
    short = {"max_tokens": 8, "budget": args.budget}
    options = {"speckv": {"lookahead": args.lookahead}, "specpc": {}}
    if args.start_layer is not None:  # a model cut to fewer layers than SpecPC's default first one
        options["specpc"]["start_layer"] = args.start_layer
    first = [{"role": "user", "content": f"{text}\n\n{questions[0][0]}"}]
    for path, granularity in (("generate_speckv", {}), ("generate_speckv_head", {"granularity": "head"})):
        if path not in done:
            yield _answer_row(path, session.generate(first, "speckv", **short, **options["speckv"], **granularity))
    with tempfile.TemporaryDirectory() as tmp, session.document(text, cache=False, reuse_kept=True) as doc:
        for (path, method, granularity), (question, _) in zip(QUESTIONS, questions):
            yield _answer_row(path, doc.ask(question, method, **short, **options[method], **granularity))
        saved = Path(tmp) / "doc.state"
        row = {"path": "save"}
        with _measured(row):
            doc.save(saved)
        yield row
        with session.document(text, cache=False, read=False) as again:
            row = {"path": "load"}
            with _measured(row):
                again.load(saved)
            yield row
        cache = doc._draft  # the document's prefix cache on the draft, as the server's pool holds them
        row = {"path": "snapshot"}
        with _measured(row):
            cache.state(len(cache.tokens) - 16)
        yield row
        row = {"path": "grow"}
        with _measured(row):
            cache._resize(cache.context.n_ctx + 1024)
        yield row


def main(args) -> None:
    out = Path(args.out)
    done = {}  # (tokens, flash): the paths measured
    for r in read_rows(out):
        done.setdefault((r["prompt_tokens_asked"], r["flash_attn"]), set()).add(r["path"])
    for flash in args.flash_attn.split(","):
        with SpecSession(draft=args.model, target=args.model, n_gpu_layers=args.n_gpu_layers, flash_attn=flash,
                         n_threads=args.threads, progress=False) as session:
            backend = "device" if session.target.kv_on_device else "host"
            for tokens in map(int, args.tokens.split(",")):
                measured = done.get((tokens, flash), set())
                if measured >= ALL_PATHS:
                    continue
                for row in paths(session, tokens, args, measured):
                    row = {"bench": "device_paths", "model": args.model, "kv": backend,
                           "n_gpu_layers": args.n_gpu_layers, "flash_attn": flash, "prompt_tokens_asked": tokens,
                           "budget": args.budget, **row}
                    append_result(out, row)
                    print(_line(row), flush=True)


def _line(r: dict) -> str:
    moved = "  ".join(f"{k} {c}x/{b / 2**20:.1f} MiB" for k, (c, b) in r["transfers"].items() if c)
    return (f"{r['prompt_tokens_asked']:6d} flash {r['flash_attn']:3s} {r['kv']:6s} {r['path']:22s} "
            f"{r['seconds']:8.3f} s  {moved}")


def summary(args) -> str:
    return "\n".join(_line(r) for r in read_rows(Path(args.out))) or "no rows"


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", default="4096,8192", help="prompt lengths, comma-separated")
    p.add_argument("--model", default="smollm2-135m-instruct-q4_1", help="the draft and the target")
    p.add_argument("--flash-attn", default="on,off", help="flash-attention settings, comma-separated")
    p.add_argument("--n-gpu-layers", type=int, default=-1)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--lookahead", type=int, default=16, help="SpecKV's draft answer, tokens")
    p.add_argument("--start-layer", type=int, default=None, help="SpecPC's first captured layer (default: its own)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="bench/results/device_paths.jsonl")


if __name__ == "__main__":
    script(__doc__, add_cli_args, main, summary)
