"""Model and context: text, generation, KV removal and compaction."""

import numpy as np
import pytest

from pyspec_gguf import Sampling, iter_text


def greedy(ctx, tokens, n=16):
    ctx.prefill(tokens)
    return list(ctx.generate(n))


def test_tokenize_roundtrip(small):
    text = "Hello, world! Ünïcödé and emoji 🙂 survive."
    tokens = small.tokenize(text, add_special=False)
    assert tokens.dtype == np.int32 and len(tokens) > 5
    assert small.detokenize(tokens) == text
    assert "".join(iter_text(small, iter(tokens))) == text


def test_chat_template(small):
    text = small.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert "Hi there" in text and "<|im_start|>assistant" in text
    tokens = small.tokenize_prompt([{"role": "user", "content": "Hi there"}])
    assert small.detokenize(tokens, special=True) == text


def test_greedy_is_deterministic_and_sampling_seeded(small, prose):
    tokens = small.tokenize(prose)[:150]
    with small.context(n_ctx=256) as ctx:
        a = greedy(ctx, tokens)
        ctx.clear()
        b = greedy(ctx, tokens)
        assert a == b and len(a) > 0
        ctx.clear()
        ctx.prefill(tokens)
        s1 = list(ctx.generate(16, Sampling(temperature=1.0, top_p=0.9, seed=7)))
        ctx.clear()
        ctx.prefill(tokens)
        s2 = list(ctx.generate(16, Sampling(temperature=1.0, top_p=0.9, seed=7)))
        assert s1 == s2


def test_prefill_progress_and_chunks(small, prose):
    tokens = small.tokenize(prose)[:200]
    seen = []
    with small.context(n_ctx=256, n_batch=64, n_ubatch=32) as ctx:
        ctx.prefill(tokens, progress=lambda done, total: seen.append((done, total)))
        chunked = ctx.logits()
        assert seen == [(64, 200), (128, 200), (192, 200), (200, 200)]
    with small.context(n_ctx=256) as ctx:
        ctx.prefill(tokens)
        np.testing.assert_allclose(chunked, ctx.logits(), atol=2e-2)


def test_logprobs_across_chunks(small, prose):
    tokens = small.tokenize(prose)[:100]
    with small.context(n_ctx=128, n_batch=512) as ctx:
        whole = ctx.prefill(tokens, want="logprobs")
    with small.context(n_ctx=128, n_batch=32, n_ubatch=32) as ctx:
        chunked = ctx.prefill(tokens, want="logprobs")
    assert whole.shape == chunked.shape == (99,)
    assert (whole <= 0).all()
    np.testing.assert_allclose(whole, chunked, atol=0.05)
    # the logprob of token i+1 is read from the logits after token i
    with small.context(n_ctx=128) as ctx:
        ctx.prefill(tokens[:50])
        lg = ctx.logits().astype(np.float64)
        ref = lg[tokens[50]] - lg.max() - np.log(np.exp(lg - lg.max()).sum())
    assert whole[49] == pytest.approx(ref, abs=1e-3)


def test_keep_all_positions_changes_nothing(small, prose):
    tokens = small.tokenize(prose)[:180]
    with small.context(n_ctx=256) as ctx:
        ref = greedy(ctx, tokens, 24)
        ctx.clear()
        ctx.prefill(tokens[:-1], want="none")
        ctx.seq_keep_positions(0, np.arange(len(tokens) - 1, dtype=np.int32))
        assert ctx.n_cells() == len(tokens) - 1
        got = greedy(ctx, tokens[-1:], 24)
    assert got == ref


def test_remove_range(small, prose):
    tokens = small.tokenize(prose)[:180]
    with small.context(n_ctx=256) as ctx:
        ctx.prefill(tokens, want="none")
        ctx.seq_rm(0, 40, 100)
        pos = ctx.cell_positions()
        kept = pos[pos >= 0]
        assert ctx.n_cells() == 120
        assert not np.isin(np.arange(40, 100), kept).any()
        assert np.array_equal(np.sort(kept), np.r_[0:40, 100:180])
        assert ctx.pos_max() == 179
        ctx.prefill(small.tokenize(" The end", add_special=False))
        assert len(list(ctx.generate(8))) > 0
        assert not ctx.layout_known  # new tokens may sit in the holes


def test_compaction_shrinks_kv_and_keeps_logits(small, prose):
    tokens = small.tokenize(prose)[:400]
    keep = np.r_[0:50, 300:399].astype(np.int32)  # the last token is decoded after
    with small.context(n_ctx=512) as ctx:
        ctx.prefill(tokens[:-1], want="none")
        full_bytes, full_state = ctx.kv_bytes(), len(ctx.state_get())
        assert full_bytes == 399 * small.kv_bytes_per_token
        ctx.seq_keep_positions(0, keep)
        ctx.prefill(tokens[-1:])
        gapped_logits = ctx.logits()
        gapped = list(ctx.generate(12))
    with small.context(n_ctx=512) as ctx:
        ctx.prefill(tokens[:-1], want="none")
        ctx.seq_keep_positions(0, keep)
        allocated = ctx.kv_bytes_allocated
        ctx.compact(0, n_ctx=256)
        assert ctx.n_ctx == 256
        assert ctx.kv_bytes_allocated == allocated // 2
        assert ctx.kv_bytes() == len(keep) * small.kv_bytes_per_token
        assert len(ctx.state_get()) < full_state * len(keep) / 399 * 1.05
        assert np.array_equal(ctx.cell_positions(), keep)
        assert ctx.layout_known
        ctx.prefill(tokens[-1:])
        np.testing.assert_array_equal(ctx.logits(), gapped_logits)
        assert list(ctx.generate(12)) == gapped


def test_compact_in_place(small, prose):
    tokens = small.tokenize(prose)[:200]
    with small.context(n_ctx=256) as ctx:
        ctx.prefill(tokens[:-1], want="none")
        ctx.seq_keep_positions(0, np.r_[0:20, 150:199].astype(np.int32))
        ctx.compact(0)
        assert ctx.n_ctx == 256
        assert np.array_equal(ctx.cell_positions(), np.r_[0:20, 150:199])
        ctx.prefill(tokens[-1:])
        assert len(list(ctx.generate(4))) > 0


def test_seq_cp_shares_a_prefill(small, prose):
    tokens = small.tokenize(prose)[:120]
    with small.context(n_ctx=512, n_seq_max=2) as ctx:
        ref = greedy(ctx, tokens, 8)
        ctx.clear()
        ctx.prefill(tokens[:-1], seq=0, want="none")
        ctx.seq_cp(0, 1)
        assert ctx.n_cells(1) == len(tokens) - 1
        assert ctx.pos_max(1) == len(tokens) - 2
        ctx.prefill(tokens[-1:], seq=1)
        assert list(ctx.generate(8, seq=1)) == ref


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc")
def test_one_libllama_per_process(small):
    import llama_cpp  # noqa: F401  (loads its libllama through ctypes)

    with open("/proc/self/maps") as f:
        libs = {line.split()[-1] for line in f if "libllama" in line}
    assert len(libs) == 1, libs


def test_every_layer_is_offloaded_by_default(small_path):
    """A GPU build offloads every layer unless told otherwise (llama.cpp's
    own default, -1: all), from Python and from the command line; the CPU
    build has nothing to offload to, and its KV cache stays in host memory."""
    import argparse
    import inspect
    from pyspec_gguf import Model, SpecSession, _native
    from pyspec_gguf.cli.common import add_load_args, session_options
    parser = argparse.ArgumentParser()
    add_load_args(parser)
    assert session_options(parser.parse_args([]))["n_gpu_layers"] == -1
    assert inspect.signature(SpecSession).parameters["n_gpu_layers"].default == -1
    with Model(small_path) as model:
        assert model.kv_on_device == _native.supports_gpu_offload()
    with Model(small_path, n_gpu_layers=0) as model:
        assert not model.kv_on_device
