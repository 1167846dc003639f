"""Answer a question about a long document with a GGUF model.

Streams the answer, then prints a stats line (prompt tokens, prefill time,
time to first token, decode speed, KV bytes).
"""

import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from .. import registry
from ..engine import Model, Sampling, iter_text


def add_cli_args(parser) -> None:
    parser.add_argument("--doc", required=True, help="text file with the document ('-' reads stdin)")
    parser.add_argument("--question", required=True, help="the question to answer")
    parser.add_argument("--target", default=None,
                        help="model spec: registry name, .gguf path or owner/repo:file.gguf "
                             "(default: the registry's target)")
    parser.add_argument("--max-tokens", type=int, default=128, help="answer length limit (default 128)")
    parser.add_argument("--n-ctx", type=int, default=0, help="context size (default: prompt + answer)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    parser.add_argument("--n-gpu-layers", type=int, default=0, help="layers offloaded to a GPU build (-1: all)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--seed", type=int, default=0)


def read_doc(path: str) -> str:
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"the document {path!r} is empty")
    return text


def build_messages(doc: str, question: str) -> list:
    return [{"role": "user", "content": f"{doc}\n\nAnswer the question about the text above.\n"
                                        f"Question: {question}"}]


def main(args) -> int:
    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    doc = read_doc(args.doc)
    target = args.target or registry.default_model("target")
    with Model(target, n_gpu_layers=args.n_gpu_layers) as model:
        tokens = model.tokenize_prompt(build_messages(doc, args.question))
        n_ctx = args.n_ctx or len(tokens) + args.max_tokens + 8
        ctx = model.context(n_ctx=n_ctx, n_threads=args.threads)
        t0 = time.perf_counter()
        with tqdm(total=len(tokens), unit="tok", desc="prefill", leave=False, file=sys.stderr) as bar:
            ctx.prefill(tokens, progress=lambda done, total: bar.update(done - bar.n))
        t_prefill = time.perf_counter() - t0
        n_out, t_first = 0, None
        stream = ctx.generate(args.max_tokens, Sampling(args.temperature, 1.0, args.seed))
        t1 = time.perf_counter()

        def counted():
            nonlocal n_out, t_first
            for tok in stream:
                if t_first is None:
                    t_first = time.perf_counter() - t0
                n_out += 1
                yield tok

        for piece in iter_text(model, counted()):
            print(piece, end="", flush=True)
        print()
        t_decode = time.perf_counter() - t1
        kv = ctx.kv_bytes()
        rate = (n_out - 1) / t_decode if n_out > 1 and t_decode > 0 else float("nan")
        print(f"[full] prompt {len(tokens)} tok | prefill {t_prefill:.2f} s "
              f"({len(tokens) / t_prefill:.0f} tok/s) | ttft {t_first or t_prefill:.2f} s | "
              f"decode {n_out} tok, {rate:.1f} tok/s | KV {kv / 2**20:.1f} MiB", file=sys.stderr)
    return 0
