"""Speculative decoding of the answer: the drafters' proposals, the
accept/reject rule's distribution, and greedy answers token for token the
same with and without speculation, for every kind of method."""

import numpy as np
import pytest

from pyspec_gguf import SpecSession, speculate
from pyspec_gguf.engine import Sampling
from pyspec_gguf.speculate import Planner, PromptLookup, Verifier, target_probs


def test_lookup_proposes_what_followed_the_latest_longest_match():
    #                 0  1  2  3  4  5  6  7  8  9
    lookup = PromptLookup(np.array([5, 6, 7, 8, 9, 5, 6, 1, 2, 3]), max_ngram=3, min_ngram=1)
    lookup.append([5, 6])
    assert lookup.match(3) == [1, 2, 3]   # "5 6" last seen at 5, then 1 2 3
    lookup.append([7])
    assert lookup.match(2) == [8, 9]      # "5 6 7", the longest match
    lookup.append([42])
    assert lookup.match(4) == []          # nothing ever followed 42
    long = PromptLookup(np.arange(3000) % 1000, max_ngram=2, min_ngram=2)
    assert long.propose([0, 1], 3) == [2, 3]  # k starts at 2, the room allowing
    long.feedback(2, 2, 3, 0.1)               # both accepted: k grows
    assert long.propose([2, 3], 1) == [4]     # but never past the room
    # the answer grows past the prompt's buffer; "98 99" was last seen in the answer itself
    assert long.propose([i % 1000 for i in range(4, 1100)], 8) == [100, 101, 102]


def test_the_planner_speculates_only_where_it_pays():
    planner = Planner(draft_cost=0.4)
    assert planner.choose({"lookup": 4, "draft": 8}) == (None, 0)  # a plain step first, to time one
    planner.batch(1, 0.10)
    planner.batch(4, 0.13)  # a batch of 4 costs 1.3 steps: 0.1 step per added token
    assert planner.extra == pytest.approx(0.7 * 0.25 + 0.3 * 0.1)
    for _ in range(20):  # the lookup is right 9 times in 10, the draft once in 10
        planner.sources["lookup"].accepted(10, 9)
        planner.sources["draft"].accepted(10, 1)
    source, k = planner.choose({"lookup": 6, "draft": 8})
    assert source == "lookup" and k > 1
    source, k = planner.choose({"lookup": 0, "draft": 8})
    assert source is None  # at 0.4 steps a token, a draft right once in 10 does not pay
    for _ in range(20):  # a draft 20 times cheaper than the target
        planner.drafted("draft", 3, 1, catch_up_s=0.005, propose_s=0.01)
        planner.sources["draft"].accepted(4, 3)
    assert planner.sources["draft"].cost == pytest.approx(0.05, rel=0.05)
    assert planner.choose({"lookup": 0, "draft": 8})[0] == "draft"
    planner.sources["draft"].unseen = 60  # but not where it must first read 60 tokens it has not seen
    assert planner.choose({"lookup": 0, "draft": 8})[0] is None


def reference_probs(logits, temperature, top_p):
    """Top-p on the plain softmax (the smallest most likely set reaching
    top_p), then the temperature over what is kept, written plainly."""
    p = np.exp(logits - logits.max())
    p /= p.sum()
    kept, mass = [], 0.0
    for i in sorted(range(len(p)), key=lambda i: -p[i]):
        kept.append(i)
        mass += p[i]
        if mass >= top_p:
            break
    out = np.zeros(len(p))
    z = np.exp((logits[kept] - logits[kept].max()) / temperature)
    out[kept] = z / z.sum()
    return out


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.5, 0.5)])
def test_target_probs_are_the_samplers(temperature, top_p):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 3.0], np.float32)
    assert target_probs(logits, Sampling(temperature, top_p)) == pytest.approx(
        reference_probs(logits.astype(np.float64), temperature, top_p))


def test_accept_reject_leaves_the_targets_distribution():
    """Whatever the proposal, the token emitted is distributed as p; the
    proposal is accepted with probability p(proposal)."""
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    p = target_probs(logits, Sampling(1.0))
    n = 40_000
    for proposal in (0, 3):  # a likely and an unlikely proposal
        verify = Verifier(Sampling(temperature=1.0, seed=11))
        outcomes = [verify.accepts(logits, proposal, position) for position in range(n)]
        freq = np.bincount([token for _, token in outcomes], minlength=len(p)) / n
        # 5 standard errors of each frequency
        assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n)), (proposal, freq, p)
        accepted = np.mean([ok for ok, _ in outcomes])
        assert abs(accepted - p[proposal]) < 5 * np.sqrt(p[proposal] * (1 - p[proposal]) / n)
    # a position's draw is its own: the same whether proposed for or not
    verify = Verifier(Sampling(temperature=1.0, seed=11))
    assert all(verify.accepts(logits, 2, i)[1] == verify.draw(logits, i) for i in range(100))


def test_a_bad_mode_is_refused(small_pair):
    with pytest.raises(ValueError, match="speculative must be one of"):
        small_pair.generate("Hello", method="full", speculative="fast")


@pytest.fixture(scope="module")
def pair(exact_pair):
    return exact_pair


@pytest.fixture(scope="module")
def document_prompt(pair, prose):
    return [{"role": "user", "content": prose + "\n\nRetell the story of the fox and then the story of the storm, "
                                                "word for word as the text tells them."}]


@pytest.fixture(scope="module")
def near_tie(pair, document_prompt):
    """The logit gap a batch's rounding alone can close: twice the largest
    difference between the target's logits for the same tokens decoded
    one at a time and in one batch (DESIGN.md §11). It is well under a
    logit, where a wrong row or position would be many."""
    model = pair.target
    prompt = model.tokenize_prompt(document_prompt)
    tokens = np.array([504, 1573, 1663, 436, 253, 1379, 837, 260], np.int32)
    with model.context(n_ctx=2048, flash_attn="off") as one, model.context(n_ctx=2048, flash_attn="off") as batch:
        one.prefill(prompt)
        single = []
        for token in tokens:
            single.append(np.array(one.logits()))
            one.decode(token[None], one.next_pos(0), 0, "last")
        batch.prefill(prompt)
        rows = np.vstack([batch.logits()[None], batch.decode(tokens[:-1], batch.next_pos(0), 0, "all")])
    rounding = float(np.abs(np.array(single) - rows).max())
    assert rows.shape == (len(tokens), model.n_vocab) and rounding < 1.0
    return 2 * rounding


class RowRecorder:
    """The target's logits row behind each token the speculative path
    emits: every token, accepted proposal or not, is a `Verifier.draw`."""

    def __init__(self, monkeypatch):
        self.rows = []
        draw = Verifier.draw

        def recorded_draw(verifier, logits, position):
            assert position == len(self.rows)
            self.rows.append(np.array(logits))
            return draw(verifier, logits, position)
        monkeypatch.setattr(Verifier, "draw", recorded_draw)


def assert_same_or_near_tie(fast: list, plain: list, rows: list, near_tie: float) -> None:
    """Greedy answers token for token the same, or parting first where the
    target's two candidates were a rounding apart."""
    if fast == plain:
        return
    i = next((i for i, (a, b) in enumerate(zip(fast, plain)) if a != b), min(len(fast), len(plain)))
    assert i < min(len(fast), len(plain)), "one answer ended early without a differing token"
    gap = rows[i][fast[i]] - rows[i][plain[i]]
    assert 0 <= gap < near_tie, f"token {i}: {fast[i]} instead of {plain[i]}, {gap:.4f} logits apart"


_plain: dict = {}


@pytest.mark.parametrize("method", ["full", "specpc", "speckv", "speckv_pc"])
@pytest.mark.parametrize("mode", ["lookup", "draft", "auto"])
def test_greedy_answers_are_the_same_with_speculation(pair, document_prompt, method, mode, monkeypatch, near_tie):
    if method not in _plain:  # one plain answer per method serves its three modes
        _plain[method] = pair.generate(document_prompt, method=method, budget=128, max_tokens=40)
    plain = _plain[method]
    recorder = RowRecorder(monkeypatch)
    fast = pair.generate(document_prompt, method=method, budget=128, max_tokens=40, speculative=mode)
    assert_same_or_near_tie(fast.tokens, plain.tokens, recorder.rows, near_tie)
    st = fast.stats
    assert st.speculative == mode
    assert st.accepted <= st.drafted and (st.accepted > 0 or mode == "auto")  # auto may find no step worth it
    assert (st.draft_kv_bytes > 0) == (mode == "draft" or (mode == "auto" and method != "full"))
    assert f"{st.accepted}/{st.drafted} drafted tokens accepted" in st.line()
    assert plain.stats.speculative == "off" and plain.stats.drafted == 0


def test_the_draft_drafts_from_a_documents_cache_question_after_question(pair, prose, monkeypatch, near_tie):
    doc = pair.document(prose, cache=False)
    plain = pair.document(prose, cache=False)
    recorder = RowRecorder(monkeypatch)
    for question in ("What did the miller's daughter write?", "What stopped the wheel?"):
        recorder.rows.clear()
        fast = doc.ask(question, method="specpc", budget=128, max_tokens=24, speculative="draft")
        slow = plain.ask(question, method="specpc", budget=128, max_tokens=24)
        assert_same_or_near_tie(fast.tokens, slow.tokens, recorder.rows, near_tie)
        assert fast.stats.drafted > 0
        if fast.tokens != slow.tokens:  # the conversations part: ask the same from here on
            break
    assert doc.ask("And the fox?", method="specpc", budget=128, max_tokens=8).stats.draft_cached > 0


def test_sampling_with_speculation_is_repeatable(pair, document_prompt):
    sampling = Sampling(temperature=0.8, top_p=0.95, seed=3)
    one = pair.generate(document_prompt, method="specpc", budget=128, max_tokens=32, sampling=sampling,
                        speculative="auto")
    two = pair.generate(document_prompt, method="specpc", budget=128, max_tokens=32, sampling=sampling,
                        speculative="auto")
    assert one.tokens == two.tokens and one.stats.drafted > 0


def test_max_tokens_and_the_end_of_the_answer_hold(pair, document_prompt):
    for max_tokens in (1, 2, 5):
        r = pair.generate(document_prompt, method="full", max_tokens=max_tokens, speculative="lookup")
        assert len(r.tokens) == max_tokens
    short = [{"role": "user", "content": "Say yes."}]
    plain = pair.generate(short, method="full", max_tokens=64)
    fast = pair.generate(short, method="full", max_tokens=64, speculative="lookup")
    assert fast.tokens == plain.tokens and fast.finish_reason == plain.finish_reason


def test_the_draft_mode_needs_a_draft_that_does_not_answer(small_path, pair, document_prompt):
    with SpecSession(target=str(small_path), draft=None, progress=False) as alone:
        with pytest.raises(ValueError, match="needs a draft model"):
            alone.generate("Hello there", method="full", speculative="draft")
    with pytest.raises(ValueError, match="needs a draft model"):
        pair.generate(document_prompt, method="draft", speculative="draft")
    alone_drafts = pair.generate(document_prompt, method="draft", max_tokens=8, speculative="auto").stats
    assert alone_drafts.speculative == "auto" and alone_drafts.draft_kv_bytes == 0  # the lookup only
