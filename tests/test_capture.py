"""Attention capture: what the eval callback reduces must be real attention."""

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize


def capture_once(model, tokens, layers, queries, reduce="max", weights=None, n_ubatch=512, n_batch=512,
                 flash_attn="off", scoring="auto"):
    with model.context(n_ctx=512, n_batch=n_batch, n_ubatch=n_ubatch, flash_attn=flash_attn) as ctx:
        ctx.capture_arm(np.array(layers, np.int32), np.array(queries, np.int32),
                        None if weights is None else np.array(weights, np.float32), reduce, scoring)
        ctx.prefill(tokens)
        scores, rows = ctx.capture_take()
        return scores, rows


def test_rows_sum_to_one(small, prose):
    tokens = small.tokenize(prose)[:200]
    n = len(tokens)
    group = small.n_head // small.n_head_kv
    layers = list(range(small.n_layer))
    # one query row, summed over the heads of each KV group: each head's
    # softmax row sums to 1, so each group sums to its head count
    scores, rows = capture_once(small, tokens, layers, [n - 1], reduce="sum")
    assert rows == len(layers)
    assert scores.shape == (len(layers), small.n_head_kv, n)
    np.testing.assert_allclose(scores.sum(axis=2), group, rtol=1e-4)
    # causal: a query sees no key after it
    scores, _ = capture_once(small, tokens, [0], [100], reduce="sum")
    assert scores[..., 101:].max() == 0.0
    np.testing.assert_allclose(scores.sum(axis=2), group, rtol=1e-4)


def test_row_weights_scale_scores(small, prose):
    tokens = small.tokenize(prose)[:120]
    plain, _ = capture_once(small, tokens, [3], [119], reduce="sum")
    half, _ = capture_once(small, tokens, [3], [119], reduce="sum", weights=[0.5])
    np.testing.assert_allclose(half, plain * 0.5, rtol=1e-5, atol=1e-7)


def test_same_scores_whatever_the_ubatch(small, prose):
    tokens = small.tokenize(prose)[:300]
    queries = list(range(236, 300))  # the window spans ubatch boundaries below
    weights = np.linspace(0, 1, len(queries))
    layers = [2, 5, 9]
    ref, rows = capture_once(small, tokens, layers, queries, weights=weights)
    assert rows == len(layers) * len(queries)
    for n_batch, n_ubatch in [(512, 32), (128, 128), (64, 7)]:
        got, rows = capture_once(small, tokens, layers, queries, weights=weights,
                                 n_batch=n_batch, n_ubatch=n_ubatch)
        assert rows == len(layers) * len(queries)
        np.testing.assert_allclose(got, ref, atol=2e-3)


def _layer0_attention(path, tokens):
    """Softmax attention of layer 0 computed in numpy from the GGUF weights
    (llama architecture): [head, query, key]."""
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}

    def weight(name):
        t = tensors[name]
        return dequantize(t.data, t.tensor_type).astype(np.float64)

    def field(key):
        f = reader.fields[key]
        return f.parts[f.data[0]].item()

    n_head = field("llama.attention.head_count")
    n_head_kv = field("llama.attention.head_count_kv")
    eps = field("llama.attention.layer_norm_rms_epsilon")
    theta = field("llama.rope.freq_base")

    x = weight("token_embd.weight")[tokens]
    x = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * weight("blk.0.attn_norm.weight")
    q = x @ weight("blk.0.attn_q.weight").T
    k = x @ weight("blk.0.attn_k.weight").T
    d = q.shape[1] // n_head
    q = q.reshape(len(tokens), n_head, d)
    k = k.reshape(len(tokens), n_head_kv, d)

    # llama.cpp's "normal" RoPE rotates adjacent pairs (the converter
    # permuted the Q/K weights for it)
    pos = np.arange(len(tokens))[:, None]
    ang = pos * theta ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(v):
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    q, k = rope(q), rope(k)
    k = np.repeat(k, n_head // n_head_kv, axis=1)
    logits = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
    logits += np.triu(np.full((len(tokens), len(tokens)), -np.inf), 1)
    p = np.exp(logits - logits.max(axis=2, keepdims=True))
    return p / p.sum(axis=2, keepdims=True), n_head_kv


def test_matches_numpy_reference(small, small_path, prose):
    tokens = small.tokenize(prose)[:24]
    ref, n_head_kv = _layer0_attention(small_path, tokens)  # [head, query, key]
    group = ref.shape[0] // n_head_kv
    per_group = ref.reshape(n_head_kv, group, *ref.shape[1:])
    q = len(tokens) - 1
    got_max, _ = capture_once(small, tokens, [0], [q], reduce="max")
    got_sum, _ = capture_once(small, tokens, [0], [q], reduce="sum")
    np.testing.assert_allclose(got_max[0], per_group[:, :, q, :].max(axis=1), atol=0.02)
    np.testing.assert_allclose(got_sum[0], per_group[:, :, q, :].sum(axis=1), atol=0.05)
    # several query rows reduced with weights, as SpecPC's window does
    qs = list(range(16, 24))
    w = np.linspace(0, 1, len(qs))
    got, _ = capture_once(small, tokens, [0], qs, reduce="max", weights=w)
    want = (per_group[:, :, qs, :] * w[None, None, :, None]).max(axis=(1, 2))
    np.testing.assert_allclose(got[0], want, atol=0.02)


def test_lookahead_rows_are_captured_per_step(small, prose):
    tokens = small.tokenize(prose)[:100]
    group = small.n_head // small.n_head_kv
    with small.context(n_ctx=256) as ctx:
        ctx.prefill(tokens)
        # arm for the next decoded position only: one row, keys 0..100
        ctx.capture_arm(np.array([1, 4], np.int32), np.array([100], np.int32), None, "sum")
        tok = next(ctx.generate(1))
        ctx.prefill([tok])
        scores, rows = ctx.capture_take()
        assert rows == 2
        assert scores.shape == (2, small.n_head_kv, 101)
        np.testing.assert_allclose(scores.sum(axis=2), group, rtol=1e-4)
        # taking resets the scores
        again, rows = ctx.capture_take()
        assert rows == 0 and again.max() == 0.0


def test_nothing_asked_while_not_armed(small, prose):
    tokens = small.tokenize(prose)[:200]
    with small.context(n_ctx=512, n_ubatch=64) as ctx:
        ctx.prefill(tokens)
        assert ctx.capture_n_asked == 0
        ctx.clear()
        ctx.capture_arm(np.array([0, 1], np.int32), np.array([199], np.int32), None, "max")
        ctx.prefill(tokens)
        # only the last ubatch holds the observation row: 2 layers asked once
        assert ctx.capture_n_asked == 2
        ctx.capture_disarm()
        ctx.clear()
        ctx.prefill(tokens)
        assert ctx.capture_n_asked == 2


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_flash_attention_capture_matches_the_softmax(small, prose, reduce):
    """With flash attention on there is no softmax tensor: the capture
    computes the observation rows' softmax from the queries and the cached
    keys. Layer 0 reads the same queries and keys either way, so its scores
    must match the softmax llama.cpp computes with flash attention off; later
    layers differ only by flash attention's own rounding upstream."""
    tokens = small.tokenize(prose)[:300]
    n = len(tokens)
    layers = list(range(small.n_layer))
    queries = list(range(n - 40, n))
    weights = np.linspace(0, 1, len(queries))
    off, rows_off = capture_once(small, tokens, layers, queries, reduce, weights)
    on, rows_on = capture_once(small, tokens, layers, queries, reduce, weights, flash_attn="on")
    assert rows_on == rows_off == len(layers) * len(queries)
    np.testing.assert_allclose(on[0], off[0], atol=2e-3 * (len(queries) if reduce == "sum" else 1))
    assert np.abs(on - off).max() < 0.1 * off.max()
    # the same ranking of the prompt
    a, b = off.max(axis=(0, 1)), on.max(axis=(0, 1))
    assert np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1] > 0.99


def test_flash_attention_rows_sum_to_one_and_are_causal(small, prose):
    tokens = small.tokenize(prose)[:200]
    group = small.n_head // small.n_head_kv
    layers = list(range(small.n_layer))
    scores, rows = capture_once(small, tokens, layers, [199], reduce="sum", flash_attn="on")
    assert rows == len(layers)
    np.testing.assert_allclose(scores.sum(axis=2), group, rtol=1e-4)
    scores, _ = capture_once(small, tokens, [0], [100], reduce="sum", flash_attn="on")
    assert scores[..., 101:].max() == 0.0
    np.testing.assert_allclose(scores.sum(axis=2), group, rtol=1e-4)


def test_flash_attention_capture_whatever_the_ubatch(small, prose):
    """Layer 0's scores do not depend on how the prompt is cut into ubatches;
    later layers move a little, since llama.cpp's CPU flash attention takes
    another (tiled) path for large ubatches."""
    tokens = small.tokenize(prose)[:300]
    queries = list(range(236, 300))
    ref, _ = capture_once(small, tokens, [0, 4], queries, flash_attn="on")
    for n_batch, n_ubatch in [(512, 32), (64, 7)]:
        got, rows = capture_once(small, tokens, [0, 4], queries, n_batch=n_batch, n_ubatch=n_ubatch,
                                 flash_attn="on")
        assert rows == 2 * len(queries)
        np.testing.assert_allclose(got[0], ref[0], atol=1e-5)
        np.testing.assert_allclose(got[1], ref[1], atol=0.05)

def _ranks(a):
    return np.argsort(np.argsort(a, axis=-1), axis=-1)


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_scores_computed_on_the_keys_backend_match_the_host(small, prose, reduce):
    """With flash attention on, scoring="graph" computes the observation
    rows' softmax and its reductions as a ggml graph on the backend that
    holds the keys (what a GPU build does by default), so only the reduced
    scores come to the host. On the CPU backend it must give the host
    path's scores, whatever the ubatches, row runs and weights."""
    from pyspec_gguf.engine import transfers, transfers_since
    tokens = small.tokenize(prose)[:300]
    n = len(tokens)
    layers = list(range(small.n_layer))
    # two runs of rows, one across a ubatch boundary, and weights
    queries = list(range(200, 212)) + list(range(n - 40, n))
    weights = np.linspace(0.2, 1, len(queries))
    for n_batch, n_ubatch in [(512, 512), (64, 48)]:
        host, rows_host = capture_once(small, tokens, layers, queries, reduce, weights, n_batch, n_ubatch,
                                       flash_attn="on", scoring="host")
        before = transfers()
        graph, rows_graph = capture_once(small, tokens, layers, queries, reduce, weights, n_batch, n_ubatch,
                                         flash_attn="on", scoring="graph")
        moved = transfers_since(before)
        assert rows_graph == rows_host == len(layers) * len(queries)
        assert np.abs(graph - host).max() < 0.01 * host.max()
        # each layer and KV head ranks the prompt as the host path does
        for got, ref in zip(graph.reshape(-1, n), host.reshape(-1, n)):
            assert np.corrcoef(_ranks(got[ref > 0]), _ranks(ref[ref > 0]))[0, 1] > 0.999
        # one score per (layer, KV head, cell) came back per run of rows, and the weights went over
        assert 0 < moved["capture_read"][1] <= 4 * len(layers) * small.n_head_kv * 512 * 4
        assert moved["capture_write"][1] == 4 * len(queries) * len(layers)


def test_keys_on_the_host_are_scored_on_the_host_by_default(small, prose):
    """scoring="auto" leaves the CPU build on its host path (the keys are in
    host memory, where reading them costs no transfer), which reads each
    captured layer's keys, and so moves far more than the graph's scores."""
    from pyspec_gguf.engine import transfers, transfers_since
    tokens = small.tokenize(prose)[:300]
    layers, queries = list(range(small.n_layer)), list(range(260, 300))
    moved = {}
    for scoring in ("auto", "host", "graph"):
        before = transfers()
        capture_once(small, tokens, layers, queries, flash_attn="on", scoring=scoring)
        moved[scoring] = transfers_since(before)
    assert moved["auto"] == moved["host"] and moved["host"]["capture_write"] == [0, 0]
    # the host path reads a cell's keys (head_dim f16 values per KV head), the graph one float per KV head
    assert moved["host"]["capture_read"][1] > 10 * moved["graph"]["capture_read"][1]
    with small.context(n_ctx=64, flash_attn="on") as ctx:
        with pytest.raises(ValueError, match="scoring must be"):
            ctx.capture_arm(np.array([0], np.int32), np.array([3], np.int32), None, "max", "gpu")
