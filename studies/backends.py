"""The native code on another llama.cpp backend: attention capture, KV
compaction, the per-head state rewrite and whole answers, saved as numbers
to compare with the CPU build's.

    python -P studies/backends.py --n-gpu-layers 0 --out cpu.npz
    GGML_VK_VISIBLE_DEVICES=0 python -P studies/backends.py --n-gpu-layers 99 --out vulkan.npz
    python -P studies/backends.py --compare cpu.npz vulkan.npz

With the layers offloaded, the KV cache and the attention tensors live in
device memory: the capture reads them with ggml_backend_tensor_get, the
compaction and the per-head rewrite go through llama_state_seq_get/set_data.
Each item is computed for every --flash-attn setting on one fixed prompt
(the essay, SmolLM2 by default), and the end-to-end answers on a needle
prompt. --compare prints, per item, the largest difference between two
files, or whether they are equal, and for each file what must hold on any
backend (a state round trip changes no logit, the per-head rewrite with one
set for all heads is the native compaction, capture rows sum to 1).

The imports are absolute: `python path/to/backends.py` runs it against the
pyspec_gguf (and llama.cpp build) that interpreter has installed. Results
are saved after each part; --parts and --lookahead shorten a slow backend's
run. A CPU-type Vulkan device such as Mesa's lavapipe is only used when
GGML_VK_VISIBLE_DEVICES names it.

Reproduces bench/README.md, "On another backend: Vulkan through lavapipe
(studies/backends.py)".
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pyspec_gguf import _native
from pyspec_gguf.bench import haystack
from pyspec_gguf.bench.tasks import make_task
from pyspec_gguf.engine import Model, Sampling
from pyspec_gguf.session import SpecSession

METHODS = ("specpc", "speckv", "speckv@head")
N_QUERIES = 32
N_GEN = 16


def capture(model, tokens, ctx_args) -> dict:
    """Scores of every layer for the last N_QUERIES rows, max and sum, and
    the logits of the plain prefill."""
    n = len(tokens)
    layers = np.arange(model.n_layer, dtype=np.int32)
    queries = np.arange(n - N_QUERIES, n, dtype=np.int32)
    out = {}
    for reduce in ("max", "sum"):
        with model.context(n_ctx=n + 64, **ctx_args) as ctx:
            ctx.capture_arm(layers, queries, None, reduce)
            ctx.prefill(tokens)
            out[f"capture.{reduce}"], rows = ctx.capture_take()
            out[f"capture.{reduce}.rows"] = np.array(rows)
            out["prefill.logits"] = ctx.logits()
    return out


def _answer(ctx, last_token) -> dict:
    ctx.prefill([last_token])
    logits = ctx.logits()
    return {"logits": logits, "tokens": np.array(list(ctx.generate(N_GEN, Sampling())), np.int32)}


def _prefilled(model, tokens, n_ctx, ctx_args):
    ctx = model.context(n_ctx=n_ctx, **ctx_args)
    ctx.prefill(tokens[:-1], want="none")
    return ctx


def compaction(model, tokens, ctx_args) -> dict:
    """A middle range removed: with holes, compacted into a smaller context,
    and the compacted state loaded into a fresh one."""
    n = len(tokens)
    a, b = n // 4, n // 2
    small = n - (b - a) + 64
    out = {}
    with _prefilled(model, tokens, n + 64, ctx_args) as ctx:
        out.update(prefixed("full", _answer(ctx, tokens[-1])))
    with _prefilled(model, tokens, n + 64, ctx_args) as ctx:
        ctx.seq_rm(0, a, b)
        out.update(prefixed("gapped", _answer(ctx, tokens[-1])))
    with _prefilled(model, tokens, n + 64, ctx_args) as ctx:
        ctx.seq_rm(0, a, b)
        ctx.compact(0, n_ctx=small)
        blob = ctx.state_get(0)
        out["compacted.state"] = np.frombuffer(blob, np.uint8)
        out.update(prefixed("compacted", _answer(ctx, tokens[-1])))
    with model.context(n_ctx=small, **ctx_args) as ctx:
        ctx.load_state(0, blob)
        out.update(prefixed("loaded", _answer(ctx, tokens[-1])))
    return prefixed("compaction", out)


def per_head(model, tokens, ctx_args, seed=0) -> dict:
    """Each (layer, KV head) keeps its own random quarter of the prompt; and
    one set for all heads, which must equal the native keep + compact."""
    n = len(tokens) - 1  # prefilled; the last token decodes at position n
    c = n // 4
    rng = np.random.default_rng(seed)

    def kept():
        return np.append(np.sort(rng.choice(n - 1, size=c - 1, replace=False)), n - 1)

    own = np.array([[kept() for _ in range(model.n_head_kv)] for _ in range(model.n_layer)], np.int32)
    one = kept().astype(np.int32)
    cells = np.arange(n - c, n, dtype=np.int32)
    out = {"keep": own}
    with _prefilled(model, tokens, n + 64, ctx_args) as ctx:
        ctx.keep_per_head(0, own, cells, n_ctx=c + 64)
        out["state"] = np.frombuffer(ctx.state_get(0), np.uint8)
        out.update(prefixed("own", _answer(ctx, tokens[-1])))
    with _prefilled(model, tokens, n + 64, ctx_args) as ctx:
        ctx.keep_per_head(0, np.broadcast_to(one, own.shape).copy(), one, n_ctx=c + 64)
        uniform = ctx.state_get(0)
        out.update(prefixed("uniform", _answer(ctx, tokens[-1])))
    with _prefilled(model, tokens, n + 64, ctx_args) as ctx:
        ctx.seq_keep_positions(0, one)
        ctx.compact(0, n_ctx=c + 64)
        out["uniform_is_native_state"] = np.array(ctx.state_get(0) == uniform)
        out.update(prefixed("native", _answer(ctx, tokens[-1])))
    return prefixed("heads", out)


def answers(args, flash) -> dict:
    """SpecSession.generate on a needle prompt, the small model as draft and target."""
    out = {}
    with SpecSession(draft=args.model, target=args.model, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                     flash_attn=flash, progress=False) as s:
        task = make_task("niah_single", s.target, args.needle_tokens, 0)
        for m in METHODS:
            options = {"lookahead": args.lookahead} if args.lookahead else {}
            if m == "specpc" and args.start_layer is not None:
                options["start_layer"] = args.start_layer  # a model cut to fewer layers than the default's 8
            r = s.generate(task.messages, method=m, budget=args.budget, max_tokens=task.max_tokens, **options)
            out.update({f"{m}.text": np.array(r.text), f"{m}.tokens": np.array(r.tokens, np.int32),
                        f"{m}.kept": r.kept})
            if r.kept_per_head is not None:
                out[f"{m}.kept_per_head"] = r.kept_per_head
            if r.scores is not None:
                out[f"{m}.scores"] = np.asarray(r.scores)
    return prefixed("generate", out)


def timed(args, out: dict, name: str, part) -> None:
    """Add what part() returns to out and how long it took, and save out
    (a slow backend keeps what it has done)."""
    t0 = time.perf_counter()
    out.update(part())
    out[f"meta.seconds.{name}"] = np.array(time.perf_counter() - t0)
    print(f"{name}: {float(out[f'meta.seconds.{name}']):.1f} s", flush=True)
    np.savez_compressed(args.out, **out)


def prefixed(prefix: str, items: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in items.items()}


def run(args) -> None:
    out = {"meta.system_info": np.array(_native.llama_system_info().strip()),
           "meta.n_gpu_layers": np.array(args.n_gpu_layers)}
    settings, parts = args.flash_attn.split(","), args.parts.split(",")
    with Model(args.model, n_gpu_layers=args.n_gpu_layers, progress=False) as model:
        tokens = model.tokenize(haystack.fit_tokens(model, args.tokens))
        out["meta.tokens"] = tokens
        for flash in settings:
            ctx_args = {"n_threads": args.threads, "flash_attn": flash}
            for part in (p for p in (capture, compaction, per_head) if p.__name__ in parts):
                timed(args, out, f"{flash}.{part.__name__}",
                      lambda: prefixed(flash, part(model, tokens, ctx_args)))
    for flash in settings if "answers" in parts else ():
        timed(args, out, f"{flash}.answers", lambda: prefixed(flash, answers(args, flash)))
    for k in sorted(k for k in out if k.endswith("uniform_is_native_state") or k.endswith(".text")):
        print(f"{k}: {out[k]}")


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, kind="stable"), kind="stable")


def set_overlap(a: np.ndarray, b: np.ndarray) -> str:
    """Kept positions as sets (per head where the last axis lists them)."""
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    share = [len(np.intersect1d(x, y)) / len(x) for x, y in zip(a2, b2)]
    return f"shared as sets {min(share):.3f} (min), {np.mean(share):.3f} (mean) over {len(share)}"


def difference(a: np.ndarray, b: np.ndarray, sets: bool = False) -> str:
    if sets and a.shape == b.shape and a.size:
        return ("equal; " if (a == b).all() else "") + set_overlap(a, b)
    if a.shape != b.shape:
        return f"shapes differ: {a.shape} vs {b.shape}"
    if a.dtype.kind in "fc":
        d = np.abs(a.astype(np.float64) - b)
        line = f"max abs diff {d.max():.3g}, mean {d.mean():.2g} (max |a| {np.abs(a).max():.3g})" if a.size else "empty"
        if a.ndim == 1 and a.size > 1000:  # logits: the greedy token
            line += ", argmax " + ("equal" if a.argmax() == b.argmax() else f"{a.argmax()} vs {b.argmax()}")
        if a.ndim == 3:  # capture scores [layer, kv_head, position]: the prompt's ranking, pooled as SpecPC does
            pa, pb = a.max(axis=(0, 1)), b.max(axis=(0, 1))
            top = len(pa) // 4
            overlap = len(np.intersect1d(np.argsort(-pa)[:top], np.argsort(-pb)[:top])) / top
            line += (f", Spearman of the max over layers and heads {np.corrcoef(ranks(pa), ranks(pb))[0, 1]:.4f}, "
                     f"top {top} overlap {overlap:.3f}")
        return line
    if a.dtype == np.uint8:  # a state blob: header and cells as bytes, then K and V (f16 here)
        header = 16 + 12 * int(a[12:16].view(np.uint32)[0])
        line = f"header and cells {'equal' if (a[:header] == b[:header]).all() else 'DIFFER'}, " \
               f"{int((a == b).sum())}/{a.size} bytes equal"
        if a.size % 2 == 0:
            fa, fb = a.view(np.float16).astype(np.float64), b.view(np.float16).astype(np.float64)
            d = np.abs(fa - fb)[np.isfinite(fa) & np.isfinite(fb)]
            line += f"; read as f16: max abs diff {d.max():.3g}, median {np.median(d):.3g}"
        return line
    if a.dtype.kind in "iub":
        n = int((a != b).sum())
        return "equal" if n == 0 else f"{n}/{a.size} elements differ"
    return "equal" if (a == b).all() else f"differ: {str(a)[:80]!r} vs {str(b)[:80]!r}"


# within one file: what must hold on any backend
SAME = [("compaction.compacted.logits", "compaction.gapped.logits"),
        ("compaction.loaded.logits", "compaction.compacted.logits"),
        ("heads.uniform.logits", "heads.native.logits")]


def consistency(path: str, d: dict) -> None:
    for flash in sorted({k.split(".")[0] for k in d if not k.startswith("meta.")}):
        for x, y in SAME:
            if f"{flash}.{x}" in d:
                print(f"{path}: {flash}.{x} vs {y}: {difference(d[f'{flash}.{x}'], d[f'{flash}.{y}'])}")
        if f"{flash}.capture.sum" in d:  # each softmax row sums to 1: N_QUERIES rows of each head of a group
            s = d[f"{flash}.capture.sum"].sum(axis=2)
            print(f"{path}: {flash}.capture.sum over positions: {s.min():.5f} .. {s.max():.5f}")


def compare(path_a: str, path_b: str) -> None:
    with np.load(path_a) as fa, np.load(path_b) as fb:
        a, b = dict(fa), dict(fb)
    for k in ("meta.system_info", "meta.n_gpu_layers"):
        print(f"{k}: {a[k]} | {b[k]}")
    for path, d in ((path_a, a), (path_b, b)):
        consistency(path, d)
    for k in sorted(set(a) | set(b)):
        if k.startswith("meta.seconds"):
            print(f"{k}: {float(a.get(k, np.nan)):.1f} s | {float(b.get(k, np.nan)):.1f} s")
        elif not k.startswith("meta."):
            print(f"{k}: " + (difference(a[k], b[k], k.endswith("kept") or k.endswith("kept_per_head"))
                              if k in a and k in b else "only in one file"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct-q4_1")
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--flash-attn", default="off,on", help="settings to run, comma-separated")
    p.add_argument("--parts", default="capture,compaction,per_head,answers", help="what to run, comma-separated")
    p.add_argument("--tokens", type=int, default=600, help="length of the fixed prompt")
    p.add_argument("--needle-tokens", type=int, default=1024)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--lookahead", type=int, default=0, help="the methods' drafted tokens (0: their default)")
    p.add_argument("--start-layer", type=int, default=None, help="SpecPC's first captured layer (default: its own)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="backends.npz")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print the differences of two files")
    args = p.parse_args()
    if args.compare:
        compare(*args.compare)
    else:
        run(args)


if __name__ == "__main__":
    main()
