"""Bad input raises a clear Python exception; the process and the session survive."""

import numpy as np
import pytest

import pyspec_gguf


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a model" * 10)
    with pytest.raises(ValueError, match="not a GGUF"):
        pyspec_gguf.Model(bad)


def test_truncated_gguf_file(tmp_path, small_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(small_path.read_bytes()[:4096])
    with pytest.raises(RuntimeError, match="llama_model_load_from_file"):
        pyspec_gguf.Model(cut)


def test_missing_model_file():
    with pytest.raises(FileNotFoundError):
        pyspec_gguf.Model("/nonexistent/model.gguf")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model"):
        pyspec_gguf.Model("no-such-model")


def test_unknown_layer(small):
    with small.context(n_ctx=64) as ctx:
        for layer in (small.n_layer, -1):
            with pytest.raises(ValueError, match="layer"):
                ctx.capture_arm(np.array([layer], np.int32), np.array([0], np.int32), None, "max")
        with pytest.raises(ValueError, match="twice"):
            ctx.capture_arm(np.array([1, 1], np.int32), np.array([0], np.int32), None, "max")
        with pytest.raises(ValueError, match="reduce"):
            ctx.capture_arm(np.array([1], np.int32), np.array([0], np.int32), None, "mean")
        with pytest.raises(ValueError, match="weights"):
            ctx.capture_arm(np.array([1], np.int32), np.array([0, 1], np.int32), np.ones(3, np.float32), "max")
        with pytest.raises(RuntimeError, match="not armed"):
            ctx.capture_take()


def test_position_out_of_range(small, prose):
    tokens = small.tokenize(prose)[:50]
    with small.context(n_ctx=64) as ctx:
        ctx.prefill(tokens, want="none")
        with pytest.raises(ValueError, match="out of range"):
            ctx.seq_keep_positions(0, np.array([0, 50], np.int32))
        with pytest.raises(ValueError, match="out of range"):
            ctx.seq_keep_positions(0, np.array([-1, 3], np.int32))
        with pytest.raises(ValueError, match="increasing"):
            ctx.seq_keep_positions(0, np.array([5, 3], np.int32))
        with pytest.raises(ValueError, match="sequence id"):
            ctx.seq_rm(3, 0, 10)
        with pytest.raises(ValueError, match="continue sequence 0 at position 50"):
            ctx.decode(np.array([1], np.int32), 60)
        with pytest.raises(ValueError, match="token id"):
            ctx.prefill([small.n_vocab + 5])
        with pytest.raises(ValueError, match="too small"):
            ctx.compact(0, n_ctx=20)
        # the context still works
        assert ctx.n_cells() == 50
        ctx.prefill(tokens[:1])
        assert len(list(ctx.generate(2))) > 0


def test_empty_prompt(small):
    with pytest.raises(ValueError, match="empty"):
        small.tokenize_prompt("")
    with pytest.raises(ValueError, match="empty"):
        small.tokenize_prompt([])
    with small.context(n_ctx=64) as ctx:
        with pytest.raises(ValueError, match="no tokens"):
            ctx.prefill([])
        with pytest.raises(ValueError, match="empty"):
            ctx.decode(np.array([], np.int32), 0)


def test_prompt_longer_than_context(small, prose):
    tokens = small.tokenize(prose)[:300]
    with small.context(n_ctx=256) as ctx:  # llama.cpp's smallest context
        assert ctx.n_ctx == 256
        with pytest.raises(ValueError, match="does not fit"):
            ctx.prefill(tokens)
        with pytest.raises(ValueError, match="context is full"):
            ctx.decode(tokens, 0)
        ctx.prefill(tokens[:10])
        assert ctx.n_cells() == 10


def test_bad_context_params(small):
    with pytest.raises(ValueError, match="flash_attn"):
        small.context(flash_attn="maybe")
    with pytest.raises(ValueError, match="n_ctx"):
        small.context(n_ctx=2)
    with pytest.raises(ValueError, match="n_seq_max"):
        small.context(n_seq_max=0)


def test_closed_context_and_model(small_path, prose):
    model = pyspec_gguf.Model(small_path)
    ctx = model.context(n_ctx=64)
    ctx.close()
    with pytest.raises(RuntimeError, match="closed"):
        ctx.prefill([1, 2, 3])
    with pytest.raises(RuntimeError, match="closed"):
        ctx.n_cells()
    ctx2 = model.context(n_ctx=64)
    with pytest.raises(RuntimeError, match="still open"):
        model._native.close()
    model.close()  # closes its contexts first
    assert ctx2.closed and model.closed
    with pytest.raises(RuntimeError, match="closed"):
        model.tokenize("hello")
    with pytest.raises(RuntimeError, match="closed"):
        ctx2.kv_bytes()
    model.close()  # twice is fine


def test_bad_state_blob(small, prose):
    tokens = small.tokenize(prose)[:40]
    with small.context(n_ctx=64) as ctx:
        ctx.prefill(tokens, want="none")
        blob = ctx.state_get()
        ctx.clear()
        with pytest.raises(ValueError, match="too short"):
            ctx.state_set(0, b"abc")
        with pytest.raises(RuntimeError):
            ctx.state_set(0, blob[: len(blob) // 2])
        assert ctx.n_cells() == 0
        ctx.state_set(0, blob)
        assert ctx.n_cells() == 40


def test_fewer_cells_than_sequences(small):
    """llama.cpp asserts when it reserves outputs for more sequences than a
    batch or the cache holds; the context refuses such sizes, at creation
    and on a reload."""
    with pytest.raises(ValueError, match="n_seq_max"):
        small.context(n_ctx=16, n_seq_max=64)
    with pytest.raises(ValueError, match="n_batch must be at least n_seq_max"):
        small.context(n_ctx=64, n_batch=1, n_seq_max=2)
    with small.context(n_ctx=64, n_seq_max=2) as ctx:
        ctx.prefill(small.tokenize("The harbour board met on Tuesday."))
        blob = ctx.state_get(0)
        with pytest.raises(ValueError, match="n_seq_max"):
            ctx.load_state(0, blob, 1)
        ctx.load_state(0, blob, 32)  # the context is still whole
        assert ctx.n_cells(0) > 0
