"""End to end on the real draft/target pair (Qwen2.5-Coder 0.5B / 1.5B)."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_pair_shares_one_tokenizer(draft, target):
    assert draft.n_vocab == target.n_vocab
    assert draft.vocab_fingerprint() == target.vocab_fingerprint()


def test_draft_capture_and_target_compaction(draft, target, prose):
    messages = [{"role": "user", "content": prose + "\n\nWhat colour was the notebook?"}]
    tokens = target.tokenize_prompt(messages)
    assert np.array_equal(tokens, draft.tokenize_prompt(messages))
    n = len(tokens)
    group = draft.n_head // draft.n_head_kv
    layers = np.arange(8, draft.n_layer, dtype=np.int32)
    with draft.context(n_ctx=n + 16) as ctx:
        ctx.capture_arm(layers, np.arange(n - 64, n, dtype=np.int32), None, "sum")
        ctx.prefill(tokens)
        scores, rows = ctx.capture_take()
    assert rows == len(layers) * 64
    assert scores.shape == (len(layers), draft.n_head_kv, n)
    np.testing.assert_allclose(scores.sum(axis=2), 64 * group, rtol=1e-3)

    with target.context(n_ctx=n + 300) as ctx:
        allocated = ctx.kv_bytes_allocated
        ctx.prefill(tokens)
        full = target.detokenize(list(ctx.generate(12)))
        assert "blue" in full.lower()
        ctx.clear()
        # keep every position, compact into a smaller context: same answer
        ctx.prefill(tokens[:-1], want="none")
        before = ctx.kv_bytes()
        ctx.seq_keep_positions(0, np.arange(n - 1, dtype=np.int32))
        ctx.compact(0, n_ctx=n + 32)
        assert ctx.kv_bytes() == before
        ctx.prefill(tokens[-1:])
        assert target.detokenize(list(ctx.generate(12))) == full
        # drop half the prompt: the KV shrinks in proportion
        ctx.clear()
        ctx.prefill(tokens[:-1], want="none")
        keep = np.r_[0:4, n // 2:n - 1].astype(np.int32)
        ctx.seq_keep_positions(0, keep)
        ctx.compact(0, n_ctx=len(keep) + 32)
        assert ctx.kv_bytes() == len(keep) * target.kv_bytes_per_token
        assert ctx.kv_bytes_allocated < allocated
        ctx.prefill(tokens[-1:])
        assert len(list(ctx.generate(4))) > 0
