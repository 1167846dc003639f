"""SpecSession and every method on SmolLM2 (draft = target, same tokenizer)."""

import numpy as np
import pytest

from pyspec_gguf import Sampling, selection
from pyspec_gguf.methods import METHODS, make_method
from pyspec_gguf.session import SpecSession, resolve_budget

from default_methods import SETTINGS

NEEDLE = "The secret code of the blue door is 7431."


@pytest.fixture(scope="module")
def session(small_path):
    with SpecSession(draft=str(small_path), target=str(small_path), progress=False) as s:
        yield s


@pytest.fixture(scope="module")
def messages(prose):
    """About 360 tokens with the chat template, the fact in the middle."""
    doc = prose[:1000] + " " + NEEDLE + " " + prose[1000:1500]
    return [{"role": "user", "content": doc + "\n\nWhat is the secret code of the blue door?"}]


@pytest.fixture(scope="module")
def full_answer(session, messages):
    return session.generate(messages, method="full", max_tokens=12)


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("level", [0, 1])
def test_budget_covering_the_prompt_equals_full(session, messages, full_answer, name, level):
    r = session.generate(messages, method=name, budget=10**6, max_tokens=12, **SETTINGS[name][level])
    assert r.tokens == full_answer.tokens
    assert np.array_equal(r.kept, np.arange(len(r.prompt_tokens)))


# auto may take full, which keeps everything
@pytest.mark.parametrize("name", [m for m in METHODS if m not in ("full", "draft", "auto")])
@pytest.mark.parametrize("level", [0, 1])
def test_every_method_honours_the_budget(session, messages, name, level):
    budget = 160
    r = session.generate(messages, method=name, budget=budget, max_tokens=6, **SETTINGS[name][level])
    n = len(r.prompt_tokens)
    assert r.stats.prompt_tokens == n > budget
    kept = r.kept
    assert np.all(np.diff(kept) > 0) and kept[0] >= 0 and kept[-1] == n - 1
    stage = METHODS[name].stage
    # prompt methods keep `budget` tokens; KV methods keep `budget` entries
    # plus the last prompt token, decoded again
    if r.kept_per_head is None:
        assert len(kept) <= budget + (stage != "prompt")
        assert r.stats.kept_tokens == len(kept)
    else:
        # every layer and KV head keeps `budget` entries of its own (their
        # union is `kept`), plus the last prompt token
        target = session.target
        assert r.kept_per_head.shape == (target.n_layer, target.n_head_kv, budget)
        assert set(np.unique(r.kept_per_head)) | {n - 1} == set(kept.tolist())
        assert r.stats.kept_tokens == budget + 1
    assert r.stats.target_kv_bytes == r.stats.kept_tokens * session.target.kv_bytes_per_token
    # the chat template's control tokens survive
    control = [i for i, t in enumerate(r.prompt_tokens) if session.target.is_control(int(t))]
    assert set(control) <= set(kept.tolist())
    assert r.stats.ttft_s > 0 and r.stats.peak_rss_bytes > 0


def test_template_tail_is_protected(session, messages):
    tail = session.template_tail(messages, session.tokenize(messages))
    text = session.target.detokenize(session.tokenize(messages)[-tail:], special=True)
    assert text.endswith("assistant\n") and "<|im_end|>" in text and "door" not in text
    assert session.template_tail("plain text", session.tokenize("plain text")) == 0


def protected(session, messages, tokens):
    return session.protected_positions(tokens, session.template_tail(messages, tokens))


def test_specpc_production_path_matches_the_rule(session, messages):
    r = session.generate(messages, method="specpc", budget=128, max_tokens=4, window=16, kernel=8, neighbours=4)
    protected_ = protected(session, messages, r.prompt_tokens)
    want = selection.select_specpc(r.scores, 128, 16, 8, 4, "max", protected_)
    assert np.array_equal(r.kept, want)
    assert len(r.scores) == len(r.prompt_tokens) and (r.scores >= 0).all()


def test_speckv_production_path_matches_the_rule(session, messages):
    r = session.generate(messages, method="speckv", budget=128, max_tokens=4, lookahead=8)
    n = len(r.prompt_tokens)
    protected_ = protected(session, messages, r.prompt_tokens)
    want = selection.select_topk(r.scores, 128, 32, 7, "max", protected_[protected_ < n - 1])
    assert len(r.scores) == n - 1
    assert np.array_equal(r.kept, np.append(want, n - 1))


@pytest.mark.parametrize("name", ["speckv", "snapkv"])
def test_per_head_production_path_matches_the_rule(session, messages, name):
    options = {"lookahead": 8} if name == "speckv" else {}
    r = session.generate(messages, method=name, budget=128, max_tokens=4, granularity="head", **options)
    n = len(r.prompt_tokens)
    target = session.target
    protected_ = protected(session, messages, r.prompt_tokens)
    assert r.scores.shape == (target.n_layer, target.n_head_kv, n - 1)
    want = selection.select_topk_per_head(r.scores, 128, 32, 7, "max", protected_[protected_ < n - 1])
    assert np.array_equal(r.kept_per_head, want)
    # heads really differ, and each keeps the window and the protected tokens
    assert len(np.unique(r.kept_per_head.reshape(-1, 128), axis=0)) > 1
    must = set(range(n - 33, n - 1)) | set(protected_[protected_ < n - 1].tolist())
    assert all(must <= set(row.tolist()) for row in r.kept_per_head.reshape(-1, 128))
    assert r.stats.times["eviction"] > 0


def test_method_names_with_granularity():
    assert make_method("speckv@head").granularity == "head"
    assert make_method("snapkv@token", window=8).window == 8
    for bad, match in [("specpc@head", "specpc has no option .granularity."), ("speckv@layer", "granularity"),
                       ("nope@head", "unknown method")]:
        with pytest.raises(ValueError, match=match):
            make_method(bad)


def test_lookahead_changes_speckv_scores(session, messages):
    snap = session.generate(messages, method="snapkv", budget=128, max_tokens=2)
    spec = session.generate(messages, method="speckv", budget=128, max_tokens=2, lookahead=16)
    assert snap.scores.shape == spec.scores.shape
    assert not np.allclose(snap.scores, spec.scores)
    # more observation rows can only raise a max-reduced score
    assert (spec.scores >= snap.scores - 1e-6).all()


def test_stream_yields_the_answer(session, messages):
    stream = session.generate(messages, method="specpc", budget=200, max_tokens=12, stream=True)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text and stream.result.stats.generated_tokens > 0


def test_fractional_budget(session, messages):
    r = session.generate(messages, method="headtail", budget=0.25, max_tokens=2)
    assert len(r.kept) == round(0.25 * len(r.prompt_tokens))
    assert resolve_budget(0.5, 11) == 6 and resolve_budget(3, 100) == 3


def test_sampling_is_passed_through(session, messages):
    a = session.generate(messages, method="full", max_tokens=10, sampling=Sampling(1.5, 0.95, 3))
    b = session.generate(messages, method="full", max_tokens=10, sampling=Sampling(1.5, 0.95, 3))
    assert a.tokens == b.tokens


@pytest.mark.parametrize("budget", [0, -5, 1.0, 1.5, -0.1, True, "many", None])
def test_bad_budget(session, messages, budget):
    with pytest.raises(ValueError, match="budget"):
        session.generate(messages, method="specpc", budget=budget)


@pytest.mark.parametrize("name,options,match", [
    ("nope", {}, "unknown method"),
    ("speckv", {"kernel": 6}, "odd"),
    ("speckv", {"window": -1}, "window"),
    ("snapkv", {"granularity": "layer"}, "granularity"),
    ("specpc", {"pool": "median"}, "pool"),
    ("specpc", {"reduction": "mean"}, "reduction"),
    ("specpc", {"lookahead": 0}, "lookahead"),
    ("specpc", {"colour": "red"}, "specpc has no option .colour.; its options: window"),
    ("snapkv", {"lookahead": 3}, "lookahead"),
    ("specprefill", {"chunk": 0}, "chunk"),
])
def test_bad_method_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        make_method(name, **options)


def test_bad_generate_input(session, messages):
    with pytest.raises(ValueError, match="empty"):
        session.generate("", method="full")
    with pytest.raises(ValueError, match="empty"):
        session.generate([], method="full")
    with pytest.raises(ValueError, match="max_tokens"):
        session.generate(messages, method="full", max_tokens=0)
    with pytest.raises(ValueError, match="start_layer"):
        session.generate(messages, method="specpc", budget=100, start_layer=999)
    with pytest.raises(ValueError, match="protected"):
        session.generate(messages, method="specpc", budget=20, protect_last=50)
    # the session still works
    assert session.generate(messages, method="headtail", budget=100, max_tokens=2).stats.kept_tokens == 100


def test_methods_needing_a_draft_refuse_without_one(small_path, messages):
    with SpecSession(draft=None, target=str(small_path), progress=False) as s:
        with pytest.raises(ValueError, match="needs a draft"):
            s.generate(messages, method="specpc")
        assert s.generate(messages, method="snapkv", budget=100, max_tokens=2).stats.kept_tokens == 101


@pytest.mark.slow
def test_mismatched_tokenizers_refused(small_path, tmp_path):
    from pyspec_gguf import registry
    with pytest.raises(ValueError, match="tokenizers differ"):
        SpecSession(draft=str(registry.fetch(registry.default_model("draft"), progress=False)),
                    target=str(small_path), progress=False)
