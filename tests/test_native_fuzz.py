"""The native boundary under fire: Hypothesis drives every entry point of
the extension with the arguments a caller could get wrong (odd layers and
positions, random keep sets, compaction sizes, state blobs truncated or
bit-flipped, per-head keep sets of wrong shapes and dtypes, tokens outside
the vocabulary) and every case must end in a result or a Python exception,
never an abort; the context must still decode afterwards.

`PYSPEC_FUZZ_EXAMPLES` sets the cases per test (default 20, CI's short
profile); `PYSPEC_FUZZ_OUT` names a JSON file that receives the count of
each outcome per entry point. The long run (bench/README.md, "The native
boundary under fire"):

    PYSPEC_FUZZ_EXAMPLES=1000 PYSPEC_FUZZ_OUT=bench/results/fuzz_native.json pytest tests/test_native_fuzz.py
"""

import atexit
import json
import os
from collections import Counter
from contextlib import contextmanager

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

EXAMPLES = int(os.environ.get("PYSPEC_FUZZ_EXAMPLES", "20"))
OUTCOMES: Counter = Counter()   # (entry point, "ok" or the exception's type name)
# what the boundary may raise: nanobind's TypeError for a wrong type or shape, and the
# extension's own ValueError / RuntimeError / IndexError (std::invalid_argument, runtime_error, out_of_range)
ALLOWED = (ValueError, TypeError, RuntimeError, IndexError, OverflowError)
N_CTX = 96
PROMPT = "The harbour board met on Tuesday and agreed the breakwater budget."
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@atexit.register
def _write_outcomes() -> None:
    path = os.environ.get("PYSPEC_FUZZ_OUT")
    if path and OUTCOMES:
        table: dict = {}
        for (entry, outcome), n in sorted(OUTCOMES.items()):
            table.setdefault(entry, {})[outcome] = n
        with open(path, "w") as f:
            json.dump(table, f, indent=1)


def attempt(entry: str, call):
    """Run one case; its result, or None where it raised an allowed exception."""
    try:
        result = call()
    except ALLOWED as e:
        OUTCOMES[(entry, type(e).__name__)] += 1
        return None
    OUTCOMES[(entry, "ok")] += 1
    return result


@contextmanager
def filled(small):
    """A new small context holding the prompt at positions 0..n-1 of
    sequence 0 (one per case: Hypothesis runs every case of a test within
    one call of its fixtures); it must still decode after the case."""
    tokens = small.tokenize(PROMPT)
    with small.context(n_ctx=N_CTX, n_batch=64, n_ubatch=64, n_seq_max=2) as ctx:
        ctx.prefill(tokens)
        yield ctx, len(tokens)
        still_decodes(ctx, small)


def still_decodes(ctx, model) -> None:
    """After any case the context answers a plain request: cleared, it
    prefills a prompt and gives finite logits."""
    ctx.clear()
    ctx.prefill(model.tokenize("Hello"))
    assert np.isfinite(ctx.logits()).all()


# ------------------------------------------------------------------ arguments

def int_arrays(lo: int, hi: int, max_size: int = 12):
    """Mostly int32 vectors (what the boundary takes); sometimes another
    dtype, a matrix, or an empty array."""
    values = st.lists(st.integers(lo, hi), max_size=max_size)
    dtype = st.sampled_from([np.int32] * 12 + [np.int64, np.float32, np.uint8])
    def build(v, d, flat):
        a = np.array(v, dtype=np.int64).astype(d)  # wraps where the dtype is narrower
        return a if flat else a.reshape(1, -1)
    return st.builds(build, values, dtype, st.sampled_from([True] * 8 + [False]))


def mostly(good, bad):
    """`good` three times in four."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda g: good if g else bad)


seqs = mostly(st.sampled_from([0, 0, 1]), st.integers(-3, 4) | st.integers(-2**31, 2**31 - 1))
# sizes a compaction may ask: small ones, and ones past int32 that no allocation can meet (none in
# between: a context of millions of cells would be allocated, slowly)
SIZES = mostly(st.integers(-5, 4 * N_CTX), st.sampled_from([-2**31, 2**31 + 7, 2**32 - 1]))
positions = mostly(st.integers(-1, 24), st.integers(-4, N_CTX + 4) | st.integers(-2**31, 2**31 - 1))


def mutated(blob: bytes, data) -> bytes:
    """The blob cut short, with bits flipped, with bytes added, or as it is."""
    how = data.draw(st.sampled_from(["cut", "flip", "extend", "same"]))
    if how == "cut":
        return blob[:data.draw(st.integers(0, max(len(blob) - 1, 0)))]
    if how == "extend":
        return blob + data.draw(st.binary(min_size=1, max_size=64))
    if how == "same" or not blob:
        return blob
    out = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(out) - 1))
        out[i] ^= 1 << data.draw(st.integers(0, 7))
    return bytes(out)


# ------------------------------------------------------------------ the model

@FUZZ
@given(text=st.text(max_size=64), add=st.booleans(), parse=st.booleans(),
       tokens=int_arrays(-5, 2**31 - 1, 8), token=st.integers(-2**31, 2**31 - 1), special=st.booleans())
def test_vocabulary(small, text, add, parse, tokens, token, special):
    native = small._native
    got = attempt("tokenize", lambda: native.tokenize(text, add, parse))
    if got is not None:
        assert got.dtype == np.int32 and ((got >= 0) & (got < small.n_vocab)).all()
    attempt("detokenize", lambda: native.detokenize(tokens, special))
    attempt("token_bytes", lambda: native.token_bytes(token, special))
    attempt("is_eog", lambda: native.is_eog(token))
    attempt("is_control", lambda: native.is_control(token))


@FUZZ
@given(roles=st.lists(st.sampled_from(["user", "assistant", "system", "tool", "", "x\x00"]), max_size=4),
       contents=st.lists(st.text(max_size=32), max_size=4), add=st.booleans(), key=st.text(max_size=24))
def test_chat_template_and_meta(small, roles, contents, add, key):
    attempt("apply_chat_template", lambda: small._native.apply_chat_template(roles, contents, add))
    attempt("meta", lambda: small._native.meta(key))


# ------------------------------------------------------------------ contexts

@FUZZ
@given(n_ctx=mostly(st.integers(0, 80), st.integers(-2, 2**32 - 1)), n_batch=st.integers(-2, 600),
       n_ubatch=st.integers(-2, 600), n_seq_max=st.integers(-1, 70),
       flash=st.sampled_from(["off", "on", "auto", "", "yes"]),
       type_k=st.sampled_from(["f16", "f32", "bf16", "q8_0", "q4_0", "q4_k", "x"]),
       type_v=st.sampled_from(["f16", "f32", "q8_0", "q4_0", "x"]))
def test_context_parameters(small, n_ctx, n_batch, n_ubatch, n_seq_max, flash, type_k, type_v):
    n_ctx = n_ctx if n_ctx <= 4096 else n_ctx | 1 << 31  # as SIZES: small, or past what can be allocated
    ctx = attempt("Context", lambda: small.context(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch,
                                                   n_seq_max=n_seq_max, flash_attn=flash, type_k=type_k,
                                                   type_v=type_v))
    if ctx is not None:
        still_decodes(ctx, small)
        ctx.close()


# ------------------------------------------------------------------ decoding

@FUZZ
@given(tokens=mostly(int_arrays(0, 49151, 40), int_arrays(-3, 60000, 40)), pos0=mostly(st.none(), positions),
       seq=seqs, want=st.sampled_from(["none", "last", "logprobs", "all"] * 3 + ["", "LAST"]),
       next_token=st.integers(-3, 60000))
def test_decode(small, tokens, pos0, seq, want, next_token):
    with filled(small) as (ctx, n):
        pos0 = (n if seq == 0 else 0) if pos0 is None else pos0  # mostly where the sequence goes on
        out = attempt("decode", lambda: ctx._native.decode(tokens, pos0, seq, want, next_token))
        if out is not None and want == "all":
            assert out.shape == (len(tokens), small.n_vocab)


@FUZZ
@given(temperature=st.floats(allow_nan=True, allow_infinity=True, width=32),
       top_p=st.floats(allow_nan=True, allow_infinity=True, width=32), seed=st.integers(0, 2**32 - 1))
def test_sampler(small, temperature, top_p, seed):
    with filled(small) as (ctx, n):
        attempt("set_sampler", lambda: ctx.set_sampler(temperature, top_p, seed))
        attempt("sample", ctx.sample)


# ------------------------------------------------------------------ capture

def distinct(lo: int, hi: int, max_size: int):
    """A valid index set: distinct, increasing int32 values in [lo, hi]."""
    return st.lists(st.integers(lo, hi), min_size=1, max_size=max_size, unique=True).map(
        lambda v: np.array(sorted(v), np.int32))


@FUZZ
@given(data=st.data(), reduce=st.sampled_from(["max", "sum"] * 3 + ["", "mean", "MAX"]),
       flash=st.sampled_from(["off", "on"]), scoring=st.sampled_from(["auto", "graph", "host", "gpu"]))
def test_capture(small, data, reduce, flash, scoring):
    n = len(small.tokenize(PROMPT))
    layers = data.draw(mostly(distinct(0, small.n_layer - 1, 6), int_arrays(-3, small.n_layer + 3, 6)))
    rows = data.draw(mostly(distinct(0, n - 1, 8), int_arrays(-4, N_CTX + 4, 8)))
    weights = data.draw(st.sampled_from(["none", "right", "any"]))
    if weights == "none":
        weights = None
    else:
        size = len(rows) if weights == "right" else data.draw(st.integers(0, 9))
        weights = np.array(data.draw(st.lists(st.floats(width=32), min_size=size, max_size=size)), np.float32)
    with small.context(n_ctx=N_CTX, n_batch=64, n_ubatch=64, flash_attn=flash) as ctx:
        if attempt("capture_arm", lambda: ctx.capture_arm(layers, rows, weights, reduce, scoring)) is not None:
            ctx.prefill(small.tokenize(PROMPT))
            taken = attempt("capture_take", ctx.capture_take)
            if taken is not None:
                scores, _ = taken
                assert scores.shape[:2] == (len(layers), small.n_head_kv)
        attempt("capture_disarm", ctx.capture_disarm)
        still_decodes(ctx, small)


# ------------------------------------------------------------------ KV operations

@FUZZ
@given(seq=seqs, p0=positions, p1=positions, keep=int_arrays(-4, N_CTX + 4, 40), dst=seqs)
def test_kv_operations(small, seq, p0, p1, keep, dst):
    with filled(small) as (ctx, n):
        attempt("seq_cp", lambda: ctx.seq_cp(seq, dst, p0, p1))
        attempt("seq_rm", lambda: ctx.seq_rm(seq, p0, p1))
        attempt("seq_keep_positions", lambda: ctx.seq_keep_positions(seq, keep))
        attempt("kv_bytes", lambda: ctx.kv_bytes(seq))
        for name in ("pos_max", "pos_min", "n_cells"):
            attempt(name, lambda: getattr(ctx, name)(seq))


@FUZZ
@given(seq=seqs, n_ctx=SIZES,
       keep=st.none() | int_arrays(0, 30, 30))
def test_compaction(small, seq, n_ctx, keep):
    with filled(small) as (ctx, n):
        if keep is not None:
            attempt("seq_keep_positions", lambda: ctx.seq_keep_positions(0, keep))
        attempt("compact", lambda: ctx.compact(seq, n_ctx))
        attempt("state_get_kept", lambda: ctx.state_get_kept(seq, keep if keep is not None
                                                             else np.arange(n, dtype=np.int32)))


# ------------------------------------------------------------------ states

@FUZZ
@given(data=st.data(), seq=seqs, n_ctx=st.integers(-5, 4 * N_CTX))
def test_state_blobs(small, data, seq, n_ctx):
    with filled(small) as (ctx, n):
        blob = mutated(ctx.state_get(0), data)
        ctx.clear()
        attempt("state_set", lambda: ctx.state_set(seq, blob))
        ctx.clear()
        attempt("load_state", lambda: ctx.load_state(seq, blob, n_ctx))


def keep_grids(n_layer: int, n_head_kv: int, n: int):
    """Per-head keep sets: the right shape and dtype, or not."""
    layers = st.sampled_from([n_layer] * 12 + [0, 1, n_layer + 1])
    heads = st.sampled_from([n_head_kv] * 12 + [0, n_head_kv + 1])
    width = st.integers(0, n + 3)
    dtype = st.sampled_from([np.int32] * 12 + [np.int64, np.float32])

    @st.composite
    def grid(draw):
        shape = (draw(layers), draw(heads), draw(width))
        values = draw(st.lists(st.integers(-3, n + 3), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        out = np.array(values, dtype=draw(dtype)).reshape(shape)
        return out.reshape(shape[0], shape[1] * shape[2]) if draw(st.integers(0, 9)) == 0 else out
    return grid()


@st.composite
def valid_keep(draw, n_layer: int, n_head_kv: int, n: int):
    """A per-head keep set as the pipeline makes one: C of the n positions
    for every layer and KV head, and C increasing cell positions."""
    c = draw(st.integers(1, n - 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    keep = np.sort(np.argsort(rng.random((n_layer, n_head_kv, n)), axis=-1)[..., :c], axis=-1).astype(np.int32)
    return keep, np.arange(n - 1 - c, n - 1, dtype=np.int32)


@FUZZ
@given(data=st.data(), seq=seqs, n_ctx=mostly(st.integers(0, 2 * N_CTX), st.integers(-5, 4 * N_CTX)))
def test_per_head_keep_sets(small, data, seq, n_ctx):
    with filled(small) as (ctx, n):
        if data.draw(st.integers(0, 3)):
            keep, cell_pos = data.draw(valid_keep(small.n_layer, small.n_head_kv, n))
        else:
            keep = data.draw(keep_grids(small.n_layer, small.n_head_kv, n))
            cell_pos = data.draw(mostly(st.just(ctx.cell_positions()), int_arrays(-3, n + 3, N_CTX + 2)))
        blob = ctx.state_get(0)
        if not data.draw(st.integers(0, 3)):
            blob = mutated(blob, data)
        attempt("state_rewrite", lambda: ctx.state_rewrite(blob, keep, cell_pos, seq))
        attempt("keep_per_head", lambda: ctx.keep_per_head(seq, keep, cell_pos, n_ctx))
