"""The methods on the real pair: Qwen2.5-Coder 0.5B draft, 1.5B target."""

import pytest

from pyspec_gguf.bench.tasks import single_needle
from pyspec_gguf.methods import METHODS
from pyspec_gguf.session import SpecSession

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair():
    with SpecSession(progress=False) as s:
        yield s


@pytest.fixture(scope="module")
def short_messages(prose):
    return [{"role": "user", "content": prose[:1200] + "\n\nWhat did the miller's daughter write in?"}]


def test_every_draft_method_equals_full_when_nothing_is_dropped(pair, short_messages):
    """The methods that read a draft of their own (tests/test_methods.py
    checks every method with one model as both)."""
    full = pair.generate(short_messages, method="full", max_tokens=8)
    for name, method in METHODS.items():
        if not method.uses_draft or name == "draft":  # `draft` is another model: its own answer
            continue
        r = pair.generate(short_messages, method=name, budget=10**6, max_tokens=8)
        assert r.tokens == full.tokens, name


# SpecPC only, at 2K tokens: SpecKV's target prefill of the whole prompt on
# the 1.5B costs CI minutes on a 2-core CPU; the benchmark measures every
# method's accuracy, on many prompts
@pytest.mark.parametrize("method", ["specpc"])
def test_needle_found_at_2k_with_budget_256(pair, method):
    task = single_needle(pair.target, 2048, seed=11)
    r = pair.generate(task.messages, method=method, budget=256, max_tokens=16)
    assert 1900 <= r.stats.prompt_tokens <= 2150
    assert r.stats.kept_tokens <= 257
    assert task.score(r.text) == 1.0, r.text
