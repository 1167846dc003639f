"""Drafts built for scoring: a draft cut to its first layers attends exactly
as the full one below the cut; a requantized one is a working model; both
are made once, cached with their sha256, and made again when the cache does
not match its record."""

import json

import numpy as np
import pytest

import pyspec_gguf
from pyspec_gguf import SpecSession, registry
from pyspec_gguf.derive import derived_draft, requantized, truncated


@pytest.fixture
def derived_cache(tmp_path, monkeypatch, small_path):
    """Derived files go to a fresh cache directory (the source stays in the
    shared one)."""
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path))
    return tmp_path / "derived"


def _capture(path, tokens, layers):
    with pyspec_gguf.Model(str(path)) as m, m.context(n_ctx=512) as ctx:
        ctx.capture_arm(np.array(layers, np.int32), np.arange(len(tokens) - 32, len(tokens), dtype=np.int32), None,
                        "max")
        ctx.prefill(tokens)
        return ctx.capture_take()[0], m.n_layer


def test_truncated_draft_attends_as_the_full_one_below_the_cut(small, small_path, derived_cache, prose):
    cut = truncated(small_path, 6)
    assert cut.parent == derived_cache and cut.stat().st_size < small_path.stat().st_size
    tokens = small.tokenize(prose)[:300]
    full, n_full = _capture(small_path, tokens, list(range(6)))
    short, n_short = _capture(cut, tokens, list(range(6)))
    assert (n_full, n_short) == (small.n_layer, 6)
    np.testing.assert_array_equal(short, full)
    record = json.loads(cut.with_suffix(".json").read_text())
    assert record["how"] == {"layers": 6} and record["size"] == cut.stat().st_size
    assert record["sha256"] == registry.sha256_file(cut)
    assert record["source_sha256"] == registry.sha256_file(small_path)


def test_derived_files_are_reused_and_remade_when_they_do_not_match(small_path, derived_cache):
    q = requantized(small_path, "q4_0")
    with pyspec_gguf.Model(str(q)) as m:
        assert m.n_layer > 0 and len(m.tokenize("hello")) > 0
    stamp = q.stat().st_mtime_ns
    assert requantized(small_path, "q4_0") == q and q.stat().st_mtime_ns == stamp  # reused
    with open(q, "r+b") as f:  # one byte changed: the sha256 no longer matches
        f.seek(q.stat().st_size - 1)
        last = f.read(1)
        f.seek(q.stat().st_size - 1)
        f.write(bytes([last[0] ^ 0xFF]))
    assert requantized(small_path, "q4_0") == q
    assert registry.sha256_file(q) == json.loads(q.with_suffix(".json").read_text())["sha256"]
    assert not list(derived_cache.glob(".*.part"))


def test_bad_derivations_are_refused(small, small_path, derived_cache):
    with pytest.raises(ValueError, match="quant must be one of"):
        requantized(small_path, "q3_xx")
    for layers in (small.n_layer, -1):
        with pytest.raises(ValueError, match="layers must be in"):
            truncated(small_path, layers)
    assert not list(derived_cache.glob("*.gguf"))


def test_session_with_a_cut_requantized_draft(small_path, derived_cache):
    with SpecSession(draft=str(small_path), target=str(small_path), draft_quant="q4_0", draft_layers=12,
                     progress=False) as s:
        assert s.draft.path == str(derived_draft(small_path, "q4_0", 12)) and s.draft.n_layer == 12
        r = s.generate("Name a colour of the sky. " * 30, method="specpc", budget=64, max_tokens=4,
                       lookahead=1, start_layer=2)
        assert len(r.kept) == 64
        # SpecPC reads layers from start_layer up: one past the cut is refused
        with pytest.raises(ValueError, match="start_layer"):
            s.generate("Name a colour of the sky. " * 30, method="specpc", budget=64, max_tokens=4, start_layer=12)


def test_the_draft_method_answers_with_the_draft(small_path, derived_cache, prose):
    """`method="draft"` is the draft alone: its greedy answer, its KV. Here
    the draft is the target cut to 6 layers, so the two differ."""
    with SpecSession(draft=str(small_path), target=str(small_path), draft_layers=6, progress=False) as s:
        assert s.draft.n_layer == 6 < s.target.n_layer
        tokens = s.target.tokenize(prose + " What did the miller keep?")
        # the session's own context options (flash attention "auto"): a near-tie in this
        # 6-layer cut can fall either way between llama.cpp's two attention paths
        with s.draft.context(n_ctx=len(tokens) + 16, **s.context_options) as ctx:
            ctx.prefill(tokens)
            expected = s.draft.detokenize(list(ctx.generate(8)))
        drafted = s.generate(tokens, method="draft", max_tokens=8)
        full = s.generate(tokens, method="full", max_tokens=8)
    assert drafted.text == expected != full.text
    assert drafted.stats.target_kv_bytes * 5 == full.stats.target_kv_bytes  # 6 of 30 layers


def test_a_declared_rope_scaling_stretches_the_limit(small, small_path, tmp_path):
    """A prompt beyond the trained context is refused naming the limit; a
    GGUF that declares RoPE scaling (llama.cpp applies it) is allowed its
    scaled length, and the refusal says so."""
    from gguf import GGUFReader

    from pyspec_gguf.derive import copy_gguf
    from pyspec_gguf.engine import PromptTooLong

    trained = small.n_ctx_train
    assert small.rope_scaling is None and small.context_limit == trained
    with pytest.raises(PromptTooLong, match=f"more than the {trained:,} that it was trained for"):
        small.check_fits(trained + 1, "this prompt")
    arch = small.meta("general.architecture")
    scaled = tmp_path / "scaled.gguf"
    copy_gguf(GGUFReader(small_path), scaled, {f"{arch}.rope.scaling.type": "linear",
                                               f"{arch}.rope.scaling.factor": 2.0,
                                               f"{arch}.rope.scaling.original_context_length": trained})
    with pyspec_gguf.Model(str(scaled)) as m:
        assert m.rope_scaling == ("linear", 2.0, trained) and m.context_limit == 2 * trained
        m.check_fits(2 * trained, "this prompt")
        with pytest.raises(PromptTooLong, match=rf"{2 * trained:,} positions its GGUF declares \(linear RoPE scaling"):
            m.check_fits(2 * trained + 1, "this prompt")
