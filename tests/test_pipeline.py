"""The pipeline of passes: contexts sized from what is decoded into them,
one draft pass shared by the stages that read it, forks that answer as
`generate` does, and the last prompt token at its own position."""

import numpy as np
import pytest

import pyspec_gguf
from pyspec_gguf import make_method
from pyspec_gguf.bench.forks import PromptForks
from pyspec_gguf.passes import DraftNeeds, TargetNeeds


@pytest.fixture(scope="module")
def session(exact_pair):
    return exact_pair


@pytest.fixture(scope="module")
def long_tokens(session, prose):
    """More than 2,050 tokens of prose, as token ids."""
    text = " ".join([prose] * 12)
    tokens = session.target.tokenize(text, add_special=False)
    assert len(tokens) > 2050
    return tokens


@pytest.mark.parametrize("method,options", [("speckv", {}), ("speckv_pc", {"pc_budget": 248})])
def test_no_length_overflows_a_context(session, long_tokens, method, options):
    """Prompt lengths on both sides of a 256-cell padding boundary of n_ctx,
    with the default 64-token lookahead (the cascade's prompt stage cuts
    from 249 tokens here): each context is sized from the prompt, the
    lookahead and the answer, so none runs out of cells. A context sized
    n + 8, as SpecKV's draft context once was, fails from n = 194 to 248."""
    for n in [248, 257]:
        r = session.generate(long_tokens[:n], method=method, budget=128, max_tokens=3, **options)
        assert r.stats.prompt_tokens == n
        assert r.kept[-1] == n - 1 and r.stats.kept_tokens == 128 + 1


@pytest.mark.slow  # two 2K prompts: a regression test, not one to run before every commit
@pytest.mark.parametrize("method,n", [("speckv", 2032), ("speckv_pc", 2049)])
def test_no_overflow_at_the_default_sizes(session, long_tokens, method, n):
    """The 2,032-token prompt that once failed, and the cascade just past its
    default 2,048-token prompt stage."""
    r = session.generate(long_tokens[:n], method=method, budget=512, max_tokens=3)
    assert r.kept[-1] == n - 1 and r.stats.kept_tokens == 512 + 1


def test_a_long_answer_fits_too(session, long_tokens):
    r = session.generate(long_tokens[:300], method="draft", max_tokens=40)
    assert r.stats.generated_tokens >= 1
    r = session.generate(long_tokens[:300], method="speckv", budget=128, max_tokens=40, lookahead=200)
    assert r.stats.kept_tokens == 129


@pytest.mark.parametrize("method", ["speckv", "snapkv", "streamingllm"])
def test_last_prompt_token_decodes_at_its_own_position(session, long_tokens, method):
    """x[N-2] is always kept, whatever the method's window: the last prompt
    token then decodes at N-1, the position `Result.kept` reports."""
    tokens = long_tokens[:300]
    options = {"window": 1} if method != "streamingllm" else {"sinks": 0}
    r = session.generate(tokens, method=method, budget=64, max_tokens=2, **options)
    assert 298 in r.kept.tolist() and r.kept[-1] == 299


def test_window_zero_is_refused_for_kv_methods():
    for name in ("speckv", "snapkv"):
        with pytest.raises(ValueError, match="window"):
            make_method(name, window=0)


def test_cascade_is_its_two_stages_composed():
    m = make_method("speckv_pc", lookahead=16, window=8)
    assert m.prompt_stage.name == "specpc" and m.kv_stage.name == "speckv"
    assert m.kv_stage.lookahead == 16 and m.kv_stage.window == 8
    # one draft pass serves both stages: SpecPC's capture and the drafted tokens
    needs = m.draft_needs()
    assert needs.lookahead == 16 and needs.step_rows and needs.window == 64
    assert m.prompt_budget(100) == 2048 and m.prompt_budget(4096) == 4096


def test_needs_merge_only_where_one_pass_serves_both():
    pc = make_method("specpc", lookahead=1).draft_needs()
    kv = make_method("speckv", lookahead=32).draft_needs()
    merged = pc.merge(kv)
    assert merged.lookahead == 32 and merged.window == pc.window
    assert make_method("specprefill").draft_needs().merge(pc) is None  # different captures
    assert make_method("selfinfo").draft_needs().merge(kv) is None     # log-probs come from a plain prefill
    assert DraftNeeds(lookahead=4).merge(DraftNeeds(lookahead=9)) == DraftNeeds(lookahead=9)
    snap, spec = make_method("snapkv").target_needs(), make_method("speckv").target_needs()
    assert snap.merge(spec) == spec and spec.merge(snap) == spec
    assert TargetNeeds(window=8).merge(TargetNeeds(window=16)) is None
    assert TargetNeeds(captures=False).merge(spec) == spec


def test_forks_answer_as_generate_does(session, long_tokens):
    """One analysis, every variant as a fork, with the methods' real options:
    the kept cells and the greedy answers equal generate's."""
    tokens = long_tokens[:256]
    protected = session.protected_positions(tokens, 0)
    variants = ("full", "specpc", "speckv@token", "snapkv@token", "speckv@head", "streamingllm", "headtail")
    options = {"speckv@token": {"lookahead": 12, "window": 16}, "speckv@head": {"lookahead": 12},
               "specpc": {"window": 32}}
    forks = PromptForks(session, tokens, protected, 8, variants, options)
    try:
        for variant in variants:
            budget = len(tokens) if variant == "full" else 128
            text, cells, _ = forks.answer(variant, budget)
            r = session.generate(tokens, method=variant, budget=budget, max_tokens=8, **options.get(variant, {}))
            assert cells == r.stats.kept_tokens, variant
            assert text == r.text, variant
        # the shared passes: one draft pass and one target pass over the prompt
        assert len(forks.analysis._drafts) == 1
    finally:
        forks.close()


def test_eviction_cut_on_the_host_answers_alike(session, long_tokens, monkeypatch):
    """With the target's KV on a device, one-set eviction reads the state
    once and drops the other cells on the host: the same cells, the same
    answers as llama.cpp's own removal and compaction."""
    from pyspec_gguf import passes
    tokens = long_tokens[:320]
    methods = ("speckv", "streamingllm")  # by scores (snapkv's path too) and by position
    before = [session.generate(tokens, method=m, budget=128, max_tokens=8) for m in methods]
    routes = []
    cut_on_host = passes._cut_on_host
    monkeypatch.setattr(passes, "_cut_on_host", lambda ctx: routes.append(cut_on_host(ctx)) or routes[-1])
    monkeypatch.setattr(session.target, "kv_on_device", True)
    after = [session.generate(tokens, method=m, budget=128, max_tokens=8) for m in methods]
    assert routes == [True] * len(methods)
    for b, a in zip(before, after):
        assert np.array_equal(b.kept, a.kept) and b.text == a.text
        assert b.stats.target_kv_bytes == a.stats.target_kv_bytes


def test_a_request_counts_what_it_moves(session, long_tokens, monkeypatch):
    """Stats.transfers counts the copies between llama.cpp's buffers and the
    host (over the bus on a GPU build): `full` makes none, SpecPC reads
    only attention, and one-set eviction reads the target's KV state once
    and writes the kept part back once, on the host route as on the device
    route."""
    tokens = long_tokens[:320]
    full = session.generate(tokens, method="full", max_tokens=4).stats
    assert full.host_bytes == 0 and all(calls == 0 for calls, _ in full.transfers.values())
    pc = session.generate(tokens, method="specpc", budget=128, max_tokens=4).stats
    assert pc.transfers["state_read"] == [0, 0] and pc.transfers["state_write"] == [0, 0]
    assert pc.transfers["capture_read"][0] > 0 and pc.host_bytes == pc.transfers["capture_read"][1]
    for on_device in (False, True):
        monkeypatch.setattr(session.target, "kv_on_device", on_device)
        kv = session.generate(tokens, method="speckv", budget=128, max_tokens=4).stats
        (reads, read_bytes), (writes, write_bytes) = kv.transfers["state_read"], kv.transfers["state_write"]
        assert (reads, writes) == (1, 1), on_device
        # the state read holds the target pass (the prompt but its last token, decoded after the
        # eviction) on the device route, or the kept cells; the write the kept cells
        assert read_bytes >= (len(tokens) - 1 if on_device else 128) * session.target.kv_bytes_per_token
        assert 128 * session.target.kv_bytes_per_token <= write_bytes < len(tokens) * session.target.kv_bytes_per_token


def test_documented_api_is_importable():
    for name in ("SpecSession", "Result", "Stats", "make_method"):
        assert hasattr(pyspec_gguf, name)


def test_result_to_dict_is_json(session, long_tokens):
    import json
    r = session.generate(long_tokens[:300], method="snapkv", budget=64, max_tokens=3)
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["text"] == r.text and d["kept"] == r.kept.tolist() and d["stats"]["method"] == "snapkv"
    assert d["stats"]["times"]["target_prefill"] > 0


def test_token_prompt_is_checked(session):
    with pytest.raises(ValueError, match="token"):
        session.generate(np.array([], np.int32), method="full")
    with pytest.raises(ValueError, match="token ids"):
        session.generate(np.array([1, 10**9]), method="full")
