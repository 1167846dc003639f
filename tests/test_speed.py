"""method="auto": each model's measured prefill speed, the predictions made
from it, and the choice between full and specpc they decide."""

import json
import re

import numpy as np
import pytest

from pyspec_gguf import SpecSession
from pyspec_gguf.cli.main import build_parser
from pyspec_gguf.methods import make_method
from pyspec_gguf.pipeline import Analysis
from pyspec_gguf.server.jobs import Policy
from pyspec_gguf.server.protocol import Request
from pyspec_gguf.speed import (CAL_CHUNK, CAL_CHUNKS, CAL_STEPS, KEEP_OBSERVED, Choice, ModelSpeed, SpeedBook,
                               speed_key)


def planted(a: float, b: float, step: float = 0.01) -> ModelSpeed:
    """Measurements that follow a·n + b·n·(p + n/2) exactly."""
    rows = [[n, p, a * n + b * n * (p + n / 2)] for n, p in [(256, 0), (256, 256), (256, 512), (256, 768)]]
    return ModelSpeed(prefill=rows, steps=[[1024, step]])


# ------------------------------------------------------------ the model

def test_the_fit_recovers_the_cost_it_was_measured_from():
    speed = planted(2e-3, 3e-7)
    a, b = speed.coefficients()
    assert a == pytest.approx(2e-3, rel=1e-6) and b == pytest.approx(3e-7, rel=1e-6)
    assert speed.prefill_s(8192) == pytest.approx(2e-3 * 8192 + 3e-7 * 8192 * 4096, rel=1e-6)
    assert speed.prefill_s(100, 8000) > speed.prefill_s(100)  # tokens after a long prefix read more keys
    assert speed.prefill_s(0) == 0.0


def test_a_fall_within_noise_fits_no_attention_cost():
    speed = ModelSpeed(prefill=[[256, 0, 1.0], [256, 256, 0.98], [256, 512, 0.97], [256, 768, 0.96]])
    a, b = speed.coefficients()
    assert b == 0.0 and a == pytest.approx(0.97 / 256, rel=0.05)


def test_observed_calls_refine_the_fit_and_only_the_newest_stay():
    speed = planted(2e-3, 0.0)
    for _ in range(KEEP_OBSERVED + 5):
        speed.observe_prefill(8192, 0, 2e-3 * 8192 + 1e-6 * 8192 * 4096)  # long prompts cost more than thought
    assert speed.observed == KEEP_OBSERVED and len(speed.prefill) == 4 + KEEP_OBSERVED
    assert speed.prefill[:4] == planted(2e-3, 0.0).prefill  # the calibration stays
    assert speed.prefill_s(8192) == pytest.approx(2e-3 * 8192 + 1e-6 * 8192 * 4096, rel=0.02)
    speed.observe_prefill(0, 0, 1.0)  # nothing prefilled: nothing learnt
    assert speed.observed == KEEP_OBSERVED


def test_the_lookahead_follows_what_it_was_seen_to_cost():
    speed = planted(2e-3, 0.0, step=0.02)
    assert speed.lookahead_s(64, 4096) == pytest.approx(63 * 0.02)
    assert speed.lookahead_s(1, 4096) == 0.0
    speed.observe_lookahead(64, 4096, 3 * 63 * 0.02)  # capture makes each step three times a plain one
    assert speed.lookahead_s(32, 8192) == pytest.approx(3 * 31 * 0.02)


def test_the_book_keeps_measurements_on_disk(tmp_path, caplog):
    path = tmp_path / "speeds.json"
    SpeedBook(path).put("model|setting", planted(2e-3, 3e-7))
    again = SpeedBook(path).get("model|setting")
    assert again.coefficients() == pytest.approx(planted(2e-3, 3e-7).coefficients())
    SpeedBook(path).update({"model|setting": lambda s: s.observe_prefill(100, 0, 0.5),
                            "unmeasured|setting": lambda s: s.observe_prefill(100, 0, 0.5)})
    book = SpeedBook(path)
    assert book.get("model|setting").observed == 1 and book.get("unmeasured|setting") is None
    path.write_text("{not json")
    assert SpeedBook(path).get("model|setting") is None
    assert "ignoring unreadable speed measurements" in caplog.text


# ------------------------------------------------------------ measured

def test_the_key_names_every_setting_the_speed_depends_on(small_pair):
    options = small_pair.context_options
    key = speed_key(small_pair.target, options, 0)
    assert small_pair.target.name in key and f"threads={options['n_threads']}" in key
    assert speed_key(small_pair.target, {**options, "flash_attn": "off" if options["flash_attn"] != "off" else "on"},
                     0) != key
    assert speed_key(small_pair.target, options, -1) != key


class Recorder:
    def __init__(self):
        self.stages, self.steps = [], []

    def __call__(self, done, total):
        self.steps.append((done, total))

    def stage(self, name):
        self.stages.append(name)


@pytest.fixture
def fresh_pair(small_path, tmp_path):
    """The small model as draft and target, with a speed book of its own."""
    with SpecSession(draft=str(small_path), target=str(small_path), progress=False) as session:
        session.speeds = SpeedBook(tmp_path / "speeds.json")
        yield session


def test_auto_measures_once_and_says_what_it_chose(fresh_pair, prose):
    text = prose
    short = fresh_pair.generate(text, method="auto", budget=4096, max_tokens=4)
    assert short.stats.method == "full" and "fits the budget" in short.stats.auto["reason"]
    assert not fresh_pair.speeds.path.exists()  # nothing to predict, nothing measured

    progress = Recorder()
    first = fresh_pair.generate(text, method="auto", budget=64, max_tokens=4, progress=progress)
    assert progress.stages[0] == "calibrate_draft"  # one file: draft and target share one measurement
    assert progress.steps[0][0] < progress.steps[0][1]  # it moves while it measures
    choice = Choice(**first.stats.auto)
    assert first.stats.method == choice.method == min(choice.predicted, key=choice.predicted.get)
    assert set(choice.predicted) == {"full", "specpc"} and choice.calibration_s > 0
    assert re.search(r"\[(full|specpc), auto: predicted full [\d.]+ s, specpc [\d.]+ s; this machine's speed "
                     r"measured in [\d.]+ s, once\]", first.stats.line())

    key = speed_key(fresh_pair.target, fresh_pair.context_options, 0)
    stored = json.loads(fresh_pair.speeds.path.read_text())["models"][key]
    # the calibration, chunk by chunk, then the call's own stage times
    assert [row[:2] for row in stored["prefill"][:CAL_CHUNKS]] == [[CAL_CHUNK, i * CAL_CHUNK]
                                                                    for i in range(CAL_CHUNKS)]
    assert all(row[2] > 0 for row in stored["prefill"]) and len(stored["steps"]) == CAL_STEPS
    assert stored["observed"] >= 1 and stored["calibration_s"] > 0
    assert choice.calibration_s == round(stored["calibration_s"], 2)  # the calibration's own time, counted once
    second = fresh_pair.generate(text, method="auto", budget=64, max_tokens=4)
    assert second.stats.auto["calibration_s"] == 0.0


def test_auto_takes_specpc_where_the_draft_holds_the_prompt(fresh_pair, prose):
    """One file is draft and target here, so one speed: uncached, specpc
    costs the target's prefill and more, and full wins; with the prompt in
    the draft's cache (a document's later question), specpc costs the
    target only its kept tokens, and wins."""
    key = speed_key(fresh_pair.target, fresh_pair.context_options, 0)
    fresh_pair.speeds.put(key, planted(2e-3, 3e-7))
    auto = make_method("auto", lookahead=8)
    tokens = fresh_pair.tokenize(prose * 4)
    method, choice = fresh_pair.choose(auto, tokens, 128)
    assert method.name == "full" and choice.predicted["specpc"] > choice.predicted["full"]
    method, choice = fresh_pair.choose(auto, tokens, 128, draft_cached=len(tokens) - 20)
    assert method.name == "specpc" and method.lookahead == 8  # auto's options go to specpc
    assert choice.predicted["specpc"] < choice.predicted["full"]
    _, cached_full = fresh_pair.choose(auto, tokens, 128, target_cached=len(tokens) - 20)
    assert cached_full.predicted["full"] < 0.1 * choice.predicted["full"]


def test_a_document_counts_what_its_caches_hold(fresh_pair, prose):
    key = speed_key(fresh_pair.target, fresh_pair.context_options, 0)
    fresh_pair.speeds.put(key, planted(2e-3, 3e-7))
    with fresh_pair.document(prose, cache=False) as doc:
        answer = doc.ask("What did the miller keep?", budget=96, max_tokens=4)
        assert answer.stats.method == "specpc"  # the draft read the document already
        assert answer.stats.auto["predicted"]["specpc"] < answer.stats.auto["predicted"]["full"]
        assert answer.stats.draft_cached > 0


def test_auto_is_resolved_before_any_pass(small_pair, prose):
    tokens = small_pair.tokenize(prose)
    with pytest.raises(ValueError, match="resolve it first"):
        Analysis(small_pair, tokens, np.empty(0, np.int64), 4, [make_method("auto")])
    with pytest.raises(ValueError, match="does not select prompt tokens"):
        small_pair.compress(prose, 64, method="auto")
    with pytest.raises(ValueError, match="auto has no option 'bogus'"):
        small_pair.generate(prose, method="auto", bogus=1)


# ------------------------------------------------------------ defaults

def test_auto_is_the_default_of_ask_chat_and_serve_not_of_compress():
    parser = build_parser()
    for command in (["ask", "--doc", "x", "--question", "q"], ["chat", "--doc", "x"], ["serve"]):
        assert parser.parse_args(command).method == "auto", command
    assert parser.parse_args(["serve"]).min_prompt_tokens is None
    assert parser.parse_args(["compress", "--doc", "x", "--question", "q"]).method == "specpc"


def test_the_servers_min_prompt_tokens_is_an_override():
    req = Request(kind="chat", prompt=[{"role": "user", "content": "hi"}])
    assert Policy().choose(req, 100)[0] == "auto"
    assert Policy(min_prompt_tokens=2048).choose(req, 100)[0] == "full"
    assert Policy(min_prompt_tokens=2048).choose(req, 4096)[0] == "auto"
