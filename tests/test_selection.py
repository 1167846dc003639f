"""Selection rules against the plain-Python references, index for index."""

import numpy as np
import pytest

import reference_selection as ref
from pyspec_gguf import selection


def random_scores(n, seed, plateaus=False):
    rng = np.random.default_rng(seed)
    s = rng.random(n).astype(np.float32) ** 4
    if plateaus:  # many exact ties, as wide max pools produce
        s = np.round(s * 5) / 5
    return s


@pytest.mark.parametrize("k,how", [(1, "max"), (5, "max"), (64, "max"), (7, "max"), (5, "avg"), (4, "avg")])
def test_pool_matches_reference(k, how):
    s = random_scores(200, k)
    np.testing.assert_allclose(selection.pool1d(s, k, how), ref.pool(s, k, how), rtol=1e-6, atol=1e-7)


def test_pool_is_centred_with_zero_padding():
    s = np.array([0, 0, 5, 0, 0, 0, 0], np.float32)
    assert list(selection.pool1d(s, 3, "max")) == [0, 5, 5, 5, 0, 0, 0]
    # even kernel: (k-1)//2 = 1 on the left, 2 on the right
    assert list(selection.pool1d(s, 4, "max")) == [5, 5, 5, 5, 0, 0, 0]
    np.testing.assert_allclose(selection.pool1d(np.ones(3, np.float32), 3, "avg"), [2 / 3, 1, 2 / 3])


def test_neighbour_offsets():
    assert list(selection.neighbour_offsets(1)) == [0]
    assert list(selection.neighbour_offsets(4)) == [0, -1, 1, 2]
    assert list(selection.neighbour_offsets(5)) == [0, -1, 1, -2, 2]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget,window,kernel,neighbours", [
    (64, 16, 8, 8), (100, 32, 64, 64), (10, 32, 5, 3), (150, 0, 1, 1), (37, 5, 7, 2)])
def test_specpc_matches_reference(seed, budget, window, kernel, neighbours):
    s = random_scores(300, seed, plateaus=seed % 2 == 0)
    protected = [3, 77] if seed % 3 == 0 else None
    got = selection.select_specpc(s, budget, window, kernel, neighbours, protected=protected)
    want = ref.specpc(list(s), budget, window, kernel, neighbours, protected=protected)
    assert got.dtype == np.int32
    assert list(got) == want
    assert len(got) == budget
    w = min(window, budget)
    assert set(range(300 - w, 300)) <= set(got.tolist())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget,window,kernel,how", [(64, 32, 7, "max"), (10, 32, 7, "max"),
                                                     (120, 16, 5, "avg"), (50, 0, 1, "max")])
def test_topk_matches_reference(seed, budget, window, kernel, how):
    s = random_scores(256, seed, plateaus=seed % 2 == 1)
    protected = [0, 1, 2] if seed % 2 else None
    got = selection.select_topk(s, budget, window, kernel, how, protected=protected)
    assert list(got) == ref.topk(list(s), budget, window, kernel, how, protected)
    assert len(got) == budget


@pytest.mark.parametrize("seed", range(4))
def test_chunks_match_reference(seed):
    s = random_scores(333, seed)
    for budget in (40, 100, 200):
        got = selection.select_chunks(s, budget, 32, window=8, protected=[1])
        assert list(got) == ref.chunks(list(s), budget, 32, 8, [1])
        assert len(got) <= budget


def test_nothing_dropped_when_the_prompt_fits():
    s = random_scores(50, 0)
    for rule in (lambda b: selection.select_specpc(s, b), lambda b: selection.select_topk(s, b),
                 lambda b: selection.select_chunks(s, b), lambda b: selection.select_head_tail(50, b),
                 lambda b: selection.select_sink_recent(50, b)):
        assert list(rule(50)) == list(range(50)) and list(rule(80)) == list(range(50))


def test_budget_smaller_than_window_keeps_the_last_tokens():
    s = random_scores(100, 1)
    assert list(selection.select_specpc(s, 10, window=64)) == list(range(90, 100))
    assert list(selection.select_topk(s, 10, window=32)) == list(range(90, 100))


def test_ties_break_by_raw_score_then_position():
    raw = np.array([0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.5, 0.1], np.float32)
    pooled = selection.pool1d(raw, 3)  # plateaus around 0.9 and 0.5
    assert list(selection.rank(pooled, raw)[:5]) == [1, 0, 2, 6, 5]
    # equal everything: earliest position first
    assert list(selection.select_topk(np.zeros(10, np.float32), 4, window=1, kernel=1)) == [0, 1, 2, 9]


def test_empty_lookahead_and_flat_scores():
    # no signal at all still gives a valid, deterministic selection
    s = np.zeros(200, np.float32)
    got = selection.select_specpc(s, 50, window=16, kernel=8, neighbours=8)
    assert len(got) == 50 and list(got) == ref.specpc([0.0] * 200, 50, 16, 8, 8)


def test_head_tail_and_sink_recent():
    assert list(selection.select_head_tail(10, 4)) == [0, 1, 8, 9]
    assert list(selection.select_head_tail(10, 5, protected=[4])) == [0, 1, 4, 8, 9]
    assert list(selection.select_sink_recent(10, 6, sinks=2)) == [0, 1, 6, 7, 8, 9]
    assert list(selection.select_sink_recent(10, 6, sinks=2, protected=[4])) == [0, 1, 4, 7, 8, 9]


def test_bad_pool():
    with pytest.raises(ValueError, match="pool"):
        selection.pool1d(np.ones(3), 3, "median")
