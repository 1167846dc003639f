"""The benchmark harness on its quick profile (SmolLM2 as draft and target),
so that it cannot rot; and the tasks it is made of."""

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from pyspec_gguf.bench import common, readme, report, run
from pyspec_gguf.bench.forks import VARIANTS
from pyspec_gguf.bench.run import BUDGETLESS
from pyspec_gguf.bench.tasks import TASKS, make_task

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", list(TASKS))
def test_tasks_fit_the_length_and_score_like_ruler(small, name):
    task = make_task(name, small, 1024, seed=3)
    again = make_task(name, small, 1024, seed=3)
    assert task == again  # generated from the seed alone
    n = len(small.tokenize_prompt(task.messages))
    assert 0.85 * 1024 <= n <= 1.1 * 1024, n
    content = task.messages[-1]["content"]
    if name not in ("common_words", "frequent_words"):
        for expected in task.expected:
            assert expected in content  # the facts are in the prompt
    assert task.score(" ".join(task.expected)) == 1.0
    assert task.score("nothing at all") == 0.0
    if len(task.expected) > 1:
        assert task.score(task.expected[0]) == pytest.approx(1 / len(task.expected))


@pytest.mark.parametrize("name", list(TASKS))
def test_answer_fits_even_restated_and_numbered(small, name):
    # chat models often repeat the prompt's answer lead, then list the items
    # one per line; a cut answer would count as a miss of the method
    task = make_task(name, small, 1024, seed=3)
    content = task.messages[-1]["content"]
    lead = content.rsplit("Answer:", 1)[-1] if "Answer:" in content else content.rsplit("?", 1)[-1]
    verbose = lead.strip() + ":\n\n" + "\n".join(f"{i}. {e}" for i, e in enumerate(task.expected, 1)) + "\n"
    assert len(small.tokenize(verbose, add_special=False)) <= task.max_tokens


def test_word_tasks_count_right(small):
    words = make_task("common_words", small, 1024, seed=1)
    listed = re.findall(r"\d+\. (\w+)", words.messages[0]["content"])
    counts = {w: listed.count(w) for w in set(listed)}
    repeats = counts[words.expected[0]]
    assert repeats >= 3 and all(counts[w] == repeats for w in words.expected)
    assert max(c for w, c in counts.items() if w not in words.expected) <= 2


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # two tasks at 512 tokens: every variant, budget and timed run of the
    # profile, on prompts half its length
    cmd = [sys.executable, "-m", "pyspec_gguf", "bench", "--profile", "quick", "--out", str(out),
           "--tasks", "niah_single,variable_tracking", "--contexts", "512"]
    done = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, cmd, done.stdout


@pytest.mark.slow
@pytest.mark.bench
def test_quick_profile_writes_every_row(quick):
    out, _, stdout = quick
    rows = [json.loads(line) for line in (out / "latest.jsonl").read_text().splitlines()]
    got = {(r["method"], r["budget"]) for r in rows}
    assert got == {(v, None) for v in BUDGETLESS} | {(v, b) for v in VARIANTS if v not in BUDGETLESS
                                                     for b in (128, 256)}
    for r in rows:
        assert r["context_tokens"] == 512 and r["n_samples"] == 2
        assert 0.0 <= r["accuracy"] <= 1.0 and set(r["per_task"]) == {"niah_single", "variable_tracking"}
        lo, hi = r["accuracy_ci"]
        assert 0.0 <= lo <= r["accuracy"] <= hi <= 1.0
        assert r["machine"]["cores"] >= 1 and r["models"]["target"] and r["commands"]
        # timed: full, speckv and speckv_pc at 256, specpc at both budgets, in 2 interleaved runs
        if r["method"] in ("full", "speckv", "speckv_pc") and r["budget"] in (None, 256) or r["method"] == "specpc":
            assert r["ttft_runs"] == 2 and 0 < r["ttft_min_s"] <= r["ttft_s"] <= r["ttft_max_s"], r["method"]
            assert r["peak_rss_bytes"] > 0 and r["decode_tok_s"] > 0 and len(r["loadavg"]) == 2
            # every end-to-end run of each method answered as its shared-prefill fork did
            assert r["timed_answer_matches"] is True, r["method"]
        else:
            assert r["ttft_runs"] == 0 and r["ttft_s"] is None and r["timed_answer_matches"] is None
    by = {(r["method"], r["budget"]): r for r in rows}
    assert by[("full", None)]["ttft_vs_full"] == 1.0 and by[("full", None)]["kv_vs_full"] == 1.0
    for budget in (128, 256):
        n = by[("full", None)]["prompt_tokens"]
        for v in ("speckv@head", "speckv", "snapkv@head", "snapkv", "streamingllm"):
            assert by[(v, budget)]["kv_vs_full"] == pytest.approx((budget + 1) / n, rel=0.02)
        for v in ("specpc", "selfinfo", "headtail"):
            assert by[(v, budget)]["kv_vs_full"] == pytest.approx(budget / n, rel=0.05), v
        # whole chunks: at most the budget
        assert budget / 2 / n < by[("specprefill", budget)]["kv_vs_full"] <= budget / n
        assert by[("specpc", budget)]["ttft_floor_s"] > 0
    # the runs of each variant alternate with the others' (run 0 of all, then run 1)
    timings = [r for r in report.load_runs(out / "runs.jsonl") if r["kind"] == "timing"]
    assert [r["run"] for r in timings] == sorted(r["run"] for r in timings)
    table = (out / "latest.md").read_text()
    assert "| speckv@head | 128 |" in table and "Accuracy per task" in table
    assert "| 512 (" in stdout


@pytest.mark.slow
@pytest.mark.bench
def test_quick_profile_resumes_without_redoing(quick):
    out, cmd, _ = quick
    before = (out / "runs.jsonl").read_text()
    done = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "runs.jsonl").read_text() == before


@pytest.mark.slow
@pytest.mark.bench
def test_quick_profile_plots(quick):
    pytest.importorskip("matplotlib")
    out, _, _ = quick
    for name in ("accuracy.png", "cost.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_keeps_one_style_per_method_across_panels():
    pytest.importorskip("matplotlib")
    many = [f"method{i:02d}" for i in range(12)]
    rows = [{"context_tokens": c, "method": m, "budget": b, "accuracy": 0.5, "accuracy_ci": (0.4, 0.6),
             "ttft_s": 1.0, "target_kv_bytes": 2**20}
            for c, methods in [(4096, many), (16384, many[5:])] for m in methods for b in (256, 1024)]
    rows += [{"context_tokens": 4096, "method": "full", "budget": None, "accuracy": 0.8,
              "accuracy_ci": (0.7, 0.9), "ttft_s": 2.0, "target_kv_bytes": 2**21}]
    fig = report.figure(report._pyplot(), rows, "accuracy")
    styles = defaultdict(set)
    for ax in fig.axes:
        for bars in ax.containers:
            line = bars.lines[0]
            styles[bars.get_label()].add((line.get_color(), line.get_marker()))
    assert set(styles) == set(many)
    assert all(len(s) == 1 for s in styles.values()), styles
    assert len({s.pop() for s in styles.values()}) == len(many)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["full", *many]


def test_interrupted_last_line_is_dropped(tmp_path):
    runs = tmp_path / "runs.jsonl"
    runs.write_text('{"kind": "timing"}\n{"kind": "answ')
    assert report.load_runs(runs) == [{"kind": "timing"}]
    runs.write_text('{"kind": "answ\n{"kind": "timing"}\n')
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        report.load_runs(runs)


def test_report_of_nothing(tmp_path):
    assert report.build(tmp_path / "runs.jsonl", tmp_path, "quick") == []
    assert (tmp_path / "latest.md").read_text() == "No results yet.\n"


def test_bad_bench_arguments():
    from pyspec_gguf.cli.main import main
    assert main(["bench", "--tasks", "nope"]) == 2
    assert main(["bench", "--variants", "speckv@layer"]) == 2
    for option in ("lookahead=1", "specpc.lookahead", "nope.lookahead=1", "specpc.lookahead=0", "specpc.nope=1"):
        assert main(["bench", "--option", option]) == 2, option
    # an option for a method that no variant runs would change nothing
    assert main(["bench", "--variants", "full,snapkv", "--option", "specpc.lookahead=1"]) == 2
    # auto answers as the method it chooses: it is timed, never scored
    assert main(["bench", "--variants", "full,auto"]) == 2


def test_auto_is_timed_with_what_it_chose(tmp_path, small, monkeypatch):
    # measured speeds planted for the timed process's setting: it predicts without calibrating
    from pyspec_gguf.speed import ModelSpeed, SpeedBook, speed_key
    book = tmp_path / "speeds.json"
    monkeypatch.setenv("PYSPEC_GGUF_SPEEDS", str(book))
    options = {"n_threads": 1, "n_batch": 512, "n_ubatch": 512, "flash_attn": "off"}
    SpeedBook(book).put(speed_key(small, options, 0), ModelSpeed(prefill=[[256, 0, 0.2], [256, 768, 0.3]],
                                                                 steps=[[1024, 0.01]]))
    prof = run.Profile(contexts=[512], budgets=[128], tasks=["niah_single"], samples=1, variants=["auto"],
                       timed={}, timing_runs=1, draft="smollm2-135m-instruct-q4_1",
                       target="smollm2-135m-instruct-q4_1")
    prof.timed = {"auto": [128]}
    runs = tmp_path / "runs.jsonl"
    run.measure(prof, runs, threads=1, only="timing")
    (row,) = report.load_runs(runs)
    assert row["variant"] == "auto" and row["auto"]["method"] in ("full", "specpc")
    assert set(row["auto"]["predicted"]) == {"full", "specpc"} and row["ttft_s"] > 0
    assert row["auto"]["calibration_s"] == 0.0
    assert [r["method"] for r in report.build(runs, tmp_path, "quick")] == ["auto"]


def test_method_options_name_their_rows():
    assert run.parse_method_options(["specpc.lookahead=1", "speckv.window=32", "specpc.weighted=false"]) == {
        "specpc": {"lookahead": 1, "weighted": False}, "speckv": {"window": 32}}
    options = {"speckv": {"window": 32}}
    assert run.variant_options(options, "speckv@head") == {"window": 32}
    assert run.variant_options(options, "snapkv") == {}
    assert report.config_label("specpc", {}, {"lookahead": 1}) == "specpc [lookahead=1]"
    assert report.config_label("specpc", {"draft": "x.q4_0.L16.gguf"}, {"lookahead": 1, "window": 8}) == \
        "specpc [lookahead=1, window=8, draft q4_0 L16]"
    # rows with other options resume apart from the defaults' rows
    row = {**_answer("specpc", 1024, "a", 1.0, 1), "models": {"draft": "d", "target": "t"}}
    assert run._key(row) != run._key({**row, "options": {"lookahead": 1}})
    assert run._key({**row, "options": {}}) == run._key(row)


def test_a_method_option_runs_end_to_end(tmp_path):
    """Answers and a timing run with an option other than the default: the
    rows carry it, the timed process ran with it (it answers as the fork),
    and the report names it beside the method as it comes."""
    prof = run.Profile(contexts=[512], budgets=[128], tasks=["niah_single"], samples=1, variants=["specpc"],
                       timed={"specpc": [128]}, timing_runs=1, options={"specpc": {"lookahead": 1}},
                       draft="smollm2-135m-instruct-q4_1", target="smollm2-135m-instruct-q4_1")
    runs = tmp_path / "runs.jsonl"
    run.measure(prof, runs, threads=1)
    rows = report.load_runs(runs)
    assert [(r["kind"], r["variant"], r["options"]) for r in rows] == [
        ("answer", "specpc", {"lookahead": 1}), ("timing", "specpc", {"lookahead": 1})]
    built = report.build(runs, tmp_path, "quick")
    assert [r["method"] for r in built] == ["specpc [lookahead=1]"]
    assert built[0]["ttft_runs"] == 1 and built[0]["timed_answer_matches"] is True
    run.measure(prof, runs, threads=1)  # resumes: nothing to do
    assert len(report.load_runs(runs)) == 2


MACHINE = {"cpu": "test cpu", "cores": 2, "platform": "test"}


def _answer(variant, budget, task, score, kv):
    return {"kind": "answer", "context_tokens": 8192, "task": task, "seed": 0, "variant": variant, "budget": budget,
            "prompt_tokens": 8100, "score": score, "target_kv_bytes": kv, "answer": "", "command": "c",
            "machine": MACHINE, "models": {}}


def _timing(variant, budget, ttft, floor=None):
    row = {"kind": "timing", "context_tokens": 8192, "variant": variant, "budget": budget, "task": "a", "seed": 0,
           "ttft_s": ttft, "decode_tok_s": 10.0, "peak_rss_bytes": 1, "times": {}, "answer": "", "command": "c",
           "machine": MACHINE, "models": {}}
    if floor:
        row["floor"] = {"floor_s": floor}
    return row


def test_targets_are_checked_at_the_longest_answered_context(tmp_path):
    # three prompts; speckv finds what full finds, snapkv nothing
    scores = {"full": [1, 1, 0.5], "specpc": [1, 0.5, 0.5], "speckv": [1, 1, 0.5], "snapkv": [0, 0, 0]}
    rows = [_answer(v, 0 if v == "full" else b, t, s[i], 800 if v == "full" else 100)
            for v, s in scores.items() for b in (256, 1024) for i, t in enumerate("abc")]
    rows = [r for i, r in enumerate(rows) if r["variant"] != "full" or i % 2 == 0]  # full once per prompt
    rows += [_timing("full", 0, 200.0), _timing("specpc", 1024, 120.0, floor=110.0)]
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    met = {name.split(": ", 1)[1]: (shown, ok) for name, shown, ok in
           report.targets(report.build(runs, tmp_path, "full"), report.load_runs(runs))}
    assert met["specpc TTFT / full's at 1024 <= 0.65"] == ("0.600", True)
    assert met["specpc TTFT / its floor's at 1024 <= 1.15"] == ("1.091", True)
    assert met["specpc accuracy / full's at 1024 >= 0.9"] == ("0.800", False)
    assert met["speckv target KV / full's at 1024 <= 0.2"] == ("0.125", True)
    assert met["speckv regains >= half of snapkv's loss to full at 256"] == ("regains 0.833 of 0.833", True)
    assert met["speckv not below snapkv beyond noise at 1024"][1] is True
    assert "| 8192 tokens: speckv regains" in (tmp_path / "latest.md").read_text()
    # a longer context only timed so far leaves the targets where the answers are
    # and has no accuracy block of its own
    timed_32k = {**_timing("full", 0, 900.0), "context_tokens": 32768, "prompt_tokens": 32000, "target_kv_bytes": 3200}
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows + [timed_32k]))
    checks = report.targets(report.build(runs, tmp_path, "full"), report.load_runs(runs))
    assert {name.split(": ", 1)[0] for name, _, _ in checks} == {"8192 tokens"}
    assert dict((name.split(": ", 1)[1], ok) for name, _, ok in checks)["specpc accuracy / full's at 1024 >= 0.9"] is False
    latest = (tmp_path / "latest.md").read_text()
    assert "| 8192 tokens (3 prompts) |" in latest and "32768 tokens (" not in latest
    # the other way round it fails, also the paired-noise check
    swapped = [{**r, "variant": {"speckv": "snapkv", "snapkv": "speckv"}.get(r["variant"], r["variant"])}
               for r in rows]
    runs.write_text("".join(json.dumps(r) + "\n" for r in swapped))
    met = {name.split(": ", 1)[1]: ok for name, _, ok in
           report.targets(report.build(runs, tmp_path, "full"), report.load_runs(runs))}
    assert met["speckv regains >= half of snapkv's loss to full at 256"] is False
    assert met["speckv not below snapkv beyond noise at 256"] is False


def test_intervals_and_paired_differences(tmp_path):
    # eight prompts: speckv finds all that full finds, snapkv loses six
    full = [1, 1, 1, 1, 1, 1, 0.5, 0]
    snap = [0, 0, 0, 0, 0, 0, 0.5, 0]
    rows = [_answer("full", 0, t, s, 800) for t, s in zip("abcdefgh", full)]
    rows += [_answer("speckv", 256, t, s, 100) for t, s in zip("abcdefgh", full)]
    rows += [_answer("snapkv", 256, t, s, 100) for t, s in zip("abcdefgh", snap)]
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    built = {r["method"]: r for r in report.build(runs, tmp_path, "full")}
    lo, hi = built["full"]["accuracy_ci"]
    assert lo < built["full"]["accuracy"] < hi and 0 <= lo and hi <= 1
    lo, hi = built["snapkv"]["accuracy_ci"]
    assert lo == 0.0 and built["snapkv"]["accuracy"] < hi <= 0.25
    diffs = {(d["a"], d["b"]): d for d in report.differences(report.load_runs(runs))}
    assert diffs[("speckv", "full")]["gap"] == 0 and diffs[("speckv", "full")]["verdict"] == "within noise"
    gap = diffs[("speckv", "snapkv")]
    assert gap["n"] == 8 and gap["gap"] == pytest.approx(0.75) and gap["lo"] > 0 and gap["verdict"] == "speckv ahead"
    assert diffs[("snapkv", "full")]["verdict"] == "full ahead"
    assert "| 8192 | 256 | speckv − snapkv | 8 | +0.750" in (tmp_path / "latest.md").read_text()


def test_a_ratio_to_full_from_another_sitting_is_marked(tmp_path):
    """Methods timed right after `full` share its sitting; one timed after
    an hour's pause does not, and the tables mark its ratio."""
    def at(row, end):
        return {**row, "time": f"2026-12-03T{end}+0000", "generated_tokens": 10, "prompt_tokens": 8000,
                "target_kv_bytes": 100}
    rows = [at(_timing("full", 0, 100.0), "10:01:41"),  # 10:00:00–10:01:41 (100 s + 1 s decode)
            at(_timing("specpc", 1024, 60.0, floor=55.0), "10:03:40"),  # starts 10:01:44
            at(_timing("full", 0, 100.0), "10:05:30"),
            at(_timing("speckv_pc", 1024, 70.0), "11:30:00")]  # starts 11:28:49
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_method = {r["method"]: r for r in report.build(runs, tmp_path, "full")}
    assert by_method["full"]["timed_beside_full"] is True
    assert by_method["specpc"]["timed_beside_full"] is True
    assert by_method["speckv_pc"]["timed_beside_full"] is False
    text = readme.timing_table(list(by_method.values()))
    assert "| speckv_pc | 1024 | 70.0 (1 run) | 0.70 ‡ |" in text
    assert "| specpc | 1024 | 60.0 (1 run) | 0.60 |" in text
    assert text.endswith(report.AWAY_FROM_FULL + ".")
    assert "0.70 ‡" in (tmp_path / "latest.md").read_text()


def test_readme_section_says_what_the_pairs_say(tmp_path):
    """The README's results come from the paired gaps: "ahead" where the
    interval excludes zero, "within noise" where not, and the rows with
    fewer prompts say so."""
    full = [1, 1, 1, 1, 1, 1, 0.5, 0]
    rows = [_answer("full", 0, t, s, 800) for t, s in zip("abcdefgh", full)]
    rows += [_answer("speckv", 256, t, s, 100) for t, s in zip("abcdefgh", full)]
    rows += [_answer("snapkv", 256, t, 0.0, 100) for t in "abcdefgh"]
    rows += [_answer("specpc", 256, t, s, 100) for t, s in zip("abcdefg", full)]  # one prompt short
    rows = [{**r, "models": {"draft": "d", "target": "t"}} for r in rows]
    rows += [{**_answer("specpc", 256, t, 1.0, 100), "models": {"draft": "d.q4_0.L16.gguf", "target": "t"}}
             for t in "abcdefgh"]
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    built = report.build(runs, tmp_path, "full")
    answers = [r for r in report.load_labelled(runs) if r["kind"] == "answer"]
    text = readme.section(built, answers, prompts_planned={8192: 40})
    assert text.startswith("### 8192 tokens: 8 of 40 prompts")
    assert "- `speckv` − `snapkv` (8 prompts): speckv ahead at 256 (+0.812 [" in text
    assert "- `speckv` − `full` (8 prompts): within noise at 256." in text  # its interval is in latest.md
    assert "- `snapkv` − `full` (8 prompts): full ahead at 256 (-0.812 [" in text
    assert "| specpc | 0.929 [" in text and ", n=7 |" in text
    assert "[draft" not in text  # a derived draft's rows stay in latest.md
    assert "Time to first token: not measured at this length yet." in text
    assert "\n\n\n" not in text  # the pair lines and the lines against full are one list
    assert "8,100 prompt tokens on average" in text
    # a method only timed so far, on a prompt of its own, leaves the accuracy prompts' length alone
    timed = {**_timing("headtail", 1024, 5.0), "prompt_tokens": 8900, "target_kv_bytes": 100,
             "models": {"draft": "d", "target": "t"}}
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows + [timed]))
    with_timing = readme.section(report.build(runs, tmp_path, "full"), answers, prompts_planned={})
    assert with_timing.startswith("### 8192 tokens: 8 prompts\n")  # none planned at this length
    assert "8,100 prompt tokens on average" in with_timing and "| headtail | 1024 | 5.0 (" in with_timing
    # the README's part between the markers is replaced, the rest kept
    doc = tmp_path / "README.md"
    doc.write_text(f"intro\n{readme.BEGIN}\nold\n{readme.END}\nafter\n")
    readme.update(doc, text)
    assert readme.current(doc) == text and doc.read_text().startswith("intro\n") and doc.read_text().endswith("after\n")
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="results: begin"):
        readme.update(doc, text)


def test_each_length_counts_the_prompts_of_its_own_profile():
    """The README's "n of N prompts" takes N from the profile that plans that
    length: 16 at 16K (long), not the full profile's 40."""
    planned = run.planned_prompts(run.PROFILES["full"])
    assert planned == {4096: 40, 8192: 40, 16384: 16, 32512: 1}
    args = run.parser().parse_args(["--profile", "full", "--samples", "2", "--out", "elsewhere"])
    assert run.planned_prompts(run.resolve(args)) == {4096: 16, 8192: 16}


@pytest.mark.slow
def test_readme_results_are_the_committed_results(tmp_path):
    """bench/README.md's results section is what `bench --report --readme`
    builds from the committed runs.jsonl: no figure in it was typed by hand."""
    runs = ROOT / "bench/results/runs.jsonl"
    built = report.build(runs, tmp_path, "full")
    answers = [r for r in report.load_labelled(runs) if r["kind"] == "answer"]
    expected = readme.section(built, answers, run.planned_prompts(run.PROFILES["full"]))
    assert readme.current(ROOT / "bench/README.md") == expected, \
        "bench/README.md's results are stale: run `pyspec-gguf bench --report --readme bench/README.md`"


def test_configurations_side_by_side(tmp_path):
    """Runs with a derived draft or flash attention are their own methods,
    compared with plain `full` and with their method as it comes; a method
    that never loads the draft keeps its name whatever the draft."""
    base = {"draft": "qwen-0.5b", "target": "qwen-1.5b"}
    cut = {"draft": "qwen2.5-0.5b-q4_k_m.q4_0.L16.gguf", "target": "qwen-1.5b", "flash_attn": "on"}
    assert report.config_label("specpc", base) == "specpc"
    assert report.config_label("specpc", cut) == "specpc [draft q4_0 L16, flash on]"
    assert report.config_label("full", cut) == report.config_label("snapkv", cut).replace("snapkv", "full") \
        == "full [flash on]"
    assert report.config_label("speckv", {**base, "draft": "x.L12.gguf"}) == "speckv [draft L12]"
    rows = [{**_timing("full", 0, 200.0), "models": base}, {**_timing("specpc", 1024, 120.0), "models": base},
            {**_timing("full", 0, 150.0), "models": cut}, {**_timing("specpc", 1024, 60.0), "models": cut}]
    rows += [{**_answer(v, b, t, 1.0, 100), "models": m} for v, b in (("full", 0), ("specpc", 1024))
             for m in (base, cut) for t in "ab"]
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    built = {r["method"]: r for r in report.build(runs, tmp_path, "full")}
    assert built["specpc"]["ttft_vs_full"] == pytest.approx(0.6)
    assert built["specpc [draft q4_0 L16, flash on]"]["ttft_vs_full"] == pytest.approx(0.3)
    assert built["full [flash on]"]["n_samples"] == 2 and built["full [flash on]"]["ttft_vs_full"] == 0.75
    md = (tmp_path / "latest.md").read_text()
    assert "| 8192 | 1024 | specpc − full | 2 |" in md
    assert "| 8192 | 1024 | specpc [draft q4_0 L16, flash on] − full | 2 |" in md
    assert "| 8192 | 1024 | specpc [draft q4_0 L16, flash on] − specpc | 2 |" in md
    assert "| full [flash on] − full | 2 |" in md
    # the answer of a method without the draft is measured once for any draft
    other = {**base, "draft": "other"}
    full, specpc = _answer("full", 0, "a", 1.0, 1), _answer("specpc", 1024, "a", 1.0, 1)
    assert run._key({**full, "models": base}) == run._key({**full, "models": other})
    assert run._key({**specpc, "models": base}) != run._key({**specpc, "models": other})


def test_document_rows_take_each_configurations_latest_run(tmp_path):
    def turn(config, t, ttft, time, correct=True):
        return {"config": config, "tokens": 8192, "seed": 0, "turn": t, "ttft_s": ttft, "time": time,
                "correct": correct}
    old = [turn("doc_specpc", t, 60.0 if t == 1 else 9.0, "2026-11-30T18:00:0" + str(t)) for t in (1, 2)]
    new = [turn("doc_specpc", t, 57.0 if t == 1 else 7.5, "2026-11-30T19:00:0" + str(t)) for t in (1, 2)]
    full = [turn("cold_full", t, 80.0, "2026-11-30T17:00:0" + str(t), correct=t == 1) for t in (1, 2)]
    (tmp_path / "document.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old + full + [{"config": "disk"}]))
    (tmp_path / "document-rerun.jsonl").write_text("".join(json.dumps(r) + "\n" for r in new))
    docs = report.document_rows(tmp_path)
    assert [(r["config"], r["turn"], r["ttft_s"]) for r in docs] == [
        ("cold_full", 1, 80.0), ("cold_full", 2, 80.0), ("doc_specpc", 1, 57.0), ("doc_specpc", 2, 7.5)]
    table = report.document_table(docs)
    assert "| cold_full | 8192 | 80.0 s | 80.0 s | 1/2 |" in table and "| doc_specpc | 8192 | 57.0 s | 7.5 s | 2/2 |" in table


def test_machine_records_the_cpu_generation():
    """Where /proc/cpuinfo gives a CPU family, a benchmark row records it,
    so that its label tells apart two CPUs sold under one name."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    m = common.machine()
    if "cpu family" not in text:
        assert "cpu_family" not in m
        return
    family = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("cpu family"))
    assert m["cpu_family"] == family and f"family {family}" in common.machine_label(m)


def test_times_of_two_machines_are_never_mixed(tmp_path):
    """A timing run resumed on another machine times again, and the report
    takes every time at one context length from one machine (the one that
    timed the most methods there, then the most configurations, then the
    most runs, then the latest)."""
    fast = {**MACHINE, "llama_system_info": "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | OPENMP = 1 |"}
    slow = {**MACHINE, "llama_system_info": "CPU : SSE3 = 1 | AVX2 = 1 | OPENMP = 1 |"}
    assert common.machine_label(fast).endswith("AVX512") and common.machine_label(slow).endswith("AVX2")
    # one model name spans CPU generations: the family and model tell them apart
    zen2, zen3 = ({**slow, "cpu_family": "23", "cpu_model": "49"}, {**slow, "cpu_family": "25", "cpu_model": "1"})
    assert len({common.machine_label(m) for m in (slow, zen2, zen3)}) == 3
    rows = [{**_timing("full", 0, 100.0), "machine": fast}, {**_timing("specpc", 1024, 40.0), "machine": fast}]
    rows += [{**_timing(v, b, t), "machine": slow, "run": run} for run, (v, b, t) in
             enumerate([("full", 0, 300.0), ("full", 0, 320.0), ("specpc", 1024, 155.0)])]
    rows = [{**r, "prompt_tokens": 8000, "target_kv_bytes": 1} for r in rows]
    pair = {"draft": "d", "target": "t"}
    assert run._key({**rows[0], "models": pair}) != run._key({**rows[0], "models": pair, "machine": slow})
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    built = {r["method"]: r for r in report.build(runs, tmp_path, "full")}
    assert built["full"]["ttft_s"] == 310.0 and built["full"]["ttft_runs"] == 2
    assert built["specpc"]["ttft_vs_full"] == pytest.approx(0.5)
    assert built["specpc"]["timing_machine"] == common.machine_label(slow)
    # more runs of fewer configurations on a later machine do not take the length over...
    rows += [{**_timing("specpc", 1024, 50.0 + run), "machine": zen2, "run": run, "prompt_tokens": 8000,
              "target_kv_bytes": 1} for run in range(5)]
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert {r["method"]: r for r in report.build(runs, tmp_path, "full")}["full"]["ttft_s"] == 310.0
    # ...every configuration timed again as often does
    rows += [{**r, "machine": zen3, "ttft_s": r["ttft_s"] / 3} for r in rows[2:5]]
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    built = {r["method"]: r for r in report.build(runs, tmp_path, "full")}
    assert built["full"]["timing_machine"] == common.machine_label(zen3)
    assert built["full"]["ttft_s"] == pytest.approx(310.0 / 3) and built["full"]["ttft_runs"] == 2


def test_more_methods_take_a_length_over_more_variants_of_fewer(tmp_path):
    """A machine that timed full and specpc, flash attention off and on
    (four configurations), keeps a length only until another times a third
    method beside those two: the table should have every method it can."""
    older = {**MACHINE, "cpu_family": "6", "cpu_model": "167"}
    newer = {**MACHINE, "cpu_family": "6", "cpu_model": "207"}
    pair = {"draft": "d", "target": "t"}
    rows = [{**_timing(v, b, t), "machine": older, "models": pair}
            for v, b, t in [("full", 0, 1300.0), ("specpc", 1024, 970.0)]]
    rows += [{**_timing(v, b, t), "machine": older, "models": {**pair, "flash_attn": "on"}}
             for v, b, t in [("full", 0, 1180.0), ("specpc", 1024, 760.0)]]
    rows = [{**r, "prompt_tokens": 32000, "target_kv_bytes": 1} for r in rows]
    runs = tmp_path / "runs.jsonl"

    def build():
        runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {r["method"]: r for r in report.build(runs, tmp_path, "scale")}

    assert build()["full"]["timing_machine"] == common.machine_label(older)
    # two methods on the newer machine, fewer configurations: the older keeps it
    rows += [{**_timing(v, b, t), "machine": newer, "models": pair, "prompt_tokens": 32000, "target_kv_bytes": 1}
             for v, b, t in [("full", 0, 1400.0), ("specpc", 1024, 1000.0)]]
    assert build()["full"]["ttft_s"] == 1300.0
    rows.append({**_timing("speckv_pc", 1024, 990.0), "machine": newer, "models": pair, "prompt_tokens": 32000,
                 "target_kv_bytes": 1})
    built = build()
    assert built["full"]["timing_machine"] == common.machine_label(newer)
    assert built["full"]["ttft_s"] == 1400.0 and built["speckv_pc"]["ttft_vs_full"] == pytest.approx(990 / 1400)
    # the older machine's flash-attention runs leave the table with it
    assert "full [flash on]" not in built


def test_a_retiming_replaces_the_earlier_sitting(tmp_path, monkeypatch):
    """`bench --retime` times again what runs.jsonl already holds, and the
    report then takes those methods' runs from the re-timing on; without it
    a resumed run skips them."""
    speed = {"now": 1.0}

    def fake_time_one(draft, target, variant, budget, context, task, threads=0, flash_attn="off", options=None):
        ttft = (100.0 if variant == "full" else 80.0) * speed["now"]
        return {"ttft_s": ttft, "decode_tok_s": 10.0, "peak_rss_bytes": 1, "times": {}, "answer": "",
                "prompt_tokens": 8000, "target_kv_bytes": 1}

    monkeypatch.setattr(run, "time_one", fake_time_one)
    prof = run.Profile(contexts=[8192], budgets=[1024], tasks=["niah_single"], samples=1,
                       variants=["full", "specpc", "snapkv"], timed={"full": [0], "specpc": [1024], "snapkv": [1024]},
                       timing_runs=2, draft="d", target="t")
    runs = tmp_path / "runs.jsonl"
    run.measure(prof, runs, only="timing")
    run.measure(prof, runs, only="timing")  # resumes: nothing left to time
    assert len(common.read_rows(runs)) == 6
    speed["now"] = 1.2  # the machine is slower in a later sitting
    run.measure(run.Profile(**{**prof.__dict__, "variants": ["full", "specpc"]}), runs, only="timing", retime=True)
    rows = common.read_rows(runs)
    assert len(rows) == 10 and sum(1 for r in rows if r.get("retime")) == 4
    built = {r["method"]: r for r in report.build(runs, tmp_path, "full")}
    assert built["full"]["ttft_s"] == pytest.approx(120.0) and built["full"]["ttft_runs"] == 2
    assert built["specpc"]["ttft_vs_full"] == pytest.approx(0.8)
    assert built["snapkv"]["ttft_s"] == pytest.approx(80.0)  # not re-timed: its one sitting stands
