"""runs.jsonl -> latest.jsonl (one row per method, budget and context
length), latest.md (the tables) and PNG plots (with matplotlib, the `bench`
extra)."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from statistics import mean, median, pstdev
from typing import Optional

import numpy as np

from .common import machine, machine_label, paired_interval
from .by_target import plot_targets, target_rows, target_table
from .standin import is_standin


def load_runs(path: Path) -> list:
    """The rows of runs.jsonl; a last line cut short by an interrupted run is
    dropped (its measurement is simply taken again)."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return rows


# the variants that never load the draft: a derived draft does not change them
DRAFT_FREE = ("full", "snapkv", "snapkv@head", "snapkv@token", "streamingllm", "headtail")
_DERIVED = re.compile(r"\.((?:q\d\w*)(?:\.L\d+)?|L\d+)\.gguf$")


def config_label(variant: str, models: dict, options: dict = None) -> str:
    """A method's name in the tables: the variant, and in brackets what its
    runs changed from the defaults (a derived draft, flash attention, the
    method's options), so that one results folder can hold several
    configurations side by side."""
    tags = [f"{k}={v}" for k, v in sorted((options or {}).items())]
    m = _DERIVED.search(models.get("draft", ""))
    if m and variant not in DRAFT_FREE:
        tags.append("draft " + m.group(1).replace(".", " "))
    if models.get("flash_attn", "off") != "off":
        tags.append(f"flash {models['flash_attn']}")
    if is_standin(models.get("target")):
        tags.append(models["target"].replace(":", " "))
    return f"{variant} [{', '.join(tags)}]" if tags else variant


def plain_method(label: str) -> str:
    """The method a table label names, without config_label's brackets."""
    return label.split(" [")[0]


def _ratio(a, b):
    return a / b if a is not None and b else None


def bootstrap_interval(scores: list, resamples: int = 2000, seed: int = 0) -> tuple:
    """95% percentile-bootstrap interval of the mean over prompts (seeded,
    so a report rebuilt from the same runs gives the same interval)."""
    x = np.asarray(scores, dtype=float)
    if len(x) < 2:
        return (float(x.mean()), float(x.mean())) if len(x) else (None, None)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    lo, hi = np.percentile(x[idx].mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def _median(values):
    values = [v for v in values if v is not None]
    return median(values) if values else None


def _timing_summary(ts: list, answer_of) -> dict:
    """The end-to-end runs of one (context, method, budget): medians, spread,
    the load each run started under, and whether every run answered as the
    shared-prefill fork of the same prompt did."""
    if not ts:
        return {"ttft_s": None, "ttft_runs": 0, "ttft_min_s": None, "ttft_max_s": None, "ttft_floor_s": None,
                "decode_tok_s": None, "peak_rss_bytes": None, "stage_times": None, "loadavg": [],
                "timed_answer_matches": None}
    ttfts = [t["ttft_s"] for t in ts]
    fork = answer_of(ts[0]["task"], ts[0]["seed"])
    stages = sorted({k for t in ts for k in t["times"]})
    return {
        "ttft_s": median(ttfts), "ttft_runs": len(ts), "ttft_min_s": min(ttfts), "ttft_max_s": max(ttfts),
        "ttft_floor_s": _median([t["floor"]["floor_s"] for t in ts if "floor" in t]),
        "decode_tok_s": _median([t["decode_tok_s"] for t in ts]),
        "peak_rss_bytes": _median([t["peak_rss_bytes"] for t in ts]),
        "stage_times": {k: _median([t["times"].get(k) for t in ts]) for k in stages},
        "loadavg": [t.get("loadavg") for t in ts],
        "timed_answer_matches": all(t["answer"] == fork for t in ts) if fork is not None else None,
    }


def current_runs(ts: list) -> list:
    """One method's timing runs less those a re-timing (`bench --retime`)
    replaced: from its last re-timing's first run on, so that the methods
    timed again side by side are compared with each other, not with runs
    from a sitting when the machine ran at another speed."""
    ts = sorted(ts, key=lambda t: t.get("time", ""))
    starts = [i for i, t in enumerate(ts) if t.get("retime") and t.get("run") == 0]
    return ts[starts[-1]:] if starts else ts


# a run that starts within this long of the previous run's end (model
# loading, the floor's draft pass) belongs to the same sitting
SITTING_PAUSE_S = 300


def sittings(ts: list) -> dict:
    """id(run) -> the number of its sitting, for the timing runs of one
    context length and machine: runs that followed each other without a
    pause. Two methods' times make a ratio side by side only where they
    share a sitting; rows without a time count as one sitting."""
    def end(t):
        return datetime.strptime(t["time"], "%Y-%m-%dT%H:%M:%S%z").timestamp() if "time" in t else 0.0

    def took(t):
        decode = t.get("generated_tokens", 0) / t["decode_tok_s"] if t.get("decode_tok_s") else 0.0
        return t["ttft_s"] + t.get("floor", {}).get("floor_s", 0.0) + decode

    out, sitting, prev_end = {}, 0, None
    for t in sorted(ts, key=end):
        if prev_end is not None and end(t) - took(t) - prev_end > SITTING_PAUSE_S:
            sitting += 1
        out[id(t)], prev_end = sitting, end(t)
    return out


def _timing_machines(raw: list) -> dict:
    """Per context length and target, the machine whose timing runs the
    report uses, so that every ratio is between runs of one machine: the one
    that timed the most methods there (a method's flash-attention, draft or
    option variants count once), then the most configurations, then the
    most runs the report would use (a re-timing replaces the runs before
    it), then the one that ran last. Timing all of a length's methods again
    on another machine, as often, so takes the length over; a few runs there
    do not, nor more variants of fewer methods. Each target has its own
    choice: a stand-in timed on one machine keeps its rows when the real
    target is timed at that length on another."""
    runs, last = defaultdict(list), {}
    for order, r in enumerate(raw):  # runs.jsonl is appended in the order the runs ran
        if r["kind"] == "timing":
            at = (_timed_as(r), machine_label(r.get("machine", {})))
            runs[(*at, r["variant"], r["budget"])].append(r)
            last[at] = order
    methods = defaultdict(set)  # ((context, target), machine) -> the methods timed there
    rank = defaultdict(lambda: [0, 0])  # ((context, target), machine) -> [configurations, runs]
    for (where, label, variant, _), ts in runs.items():
        methods[(where, label)].add(plain_method(variant))
        rank[(where, label)][0] += 1
        rank[(where, label)][1] += len(current_runs(ts))
    machines = defaultdict(list)
    for where, label in rank:
        machines[where].append(label)
    return {where: max(labels, key=lambda m: (len(methods[(where, m)]), *rank[(where, m)], last[(where, m)]))
            for where, labels in machines.items()}


def _timed_as(r: dict) -> tuple:
    """What one machine's choice covers: a context length and a target."""
    return r["context_tokens"], r["models"].get("target")


def load_labelled(runs: Path) -> list:
    """The rows of runs.jsonl, each variant named as the tables name it."""
    raw = load_runs(runs)
    for r in raw:
        r["variant"] = config_label(r["variant"], r["models"], r.get("options"))
    return raw


def build(runs: Path, out: Path, profile: str) -> list:
    raw = load_labelled(runs)
    answers = [r for r in raw if r["kind"] == "answer"]
    noise = sorted({r["models"]["target"] for r in answers if is_standin(r["models"].get("target"))})
    if noise:
        raise ValueError(f"{runs} holds answers of {', '.join(noise)}: a stand-in's answers are noise and "
                         "never reach an accuracy table (its rows are timing runs only)")
    groups, timings = defaultdict(list), defaultdict(list)
    for r in answers:
        groups[(r["context_tokens"], r["variant"], r["budget"])].append(r)
    timed_on = _timing_machines(raw)
    for r in raw:
        if r["kind"] == "timing" and machine_label(r.get("machine", {})) == timed_on[_timed_as(r)]:
            timings[(r["context_tokens"], r["variant"], r["budget"])].append(r)
    sitting_of = {}
    for context in {key[0] for key in timings}:
        sitting_of.update(sittings([t for key, ts in timings.items() if key[0] == context for t in ts]))
    timings = {key: current_runs(ts) for key, ts in timings.items()}
    commands = sorted({r["command"] for r in raw})
    rows = []
    for key in sorted(set(groups) | set(timings)):
        context, variant, budget = key
        rs, ts = groups.get(key, []), timings.get(key, [])
        models = (rs or ts)[0]["models"]
        full = reference_full(context, models, set(groups) | set(timings))
        full_rs = groups.get((context, full, 0), [])
        full_runs = timings.get((context, full, 0), [])
        full_t = _timing_summary(full_runs, lambda *_: None)
        # None where either is untimed; False: no run of this one shares a sitting with full's
        beside_full = (bool({sitting_of[id(t)] for t in ts} & {sitting_of[id(t)] for t in full_runs})
                       if ts and full_runs else None)
        scores = [r["score"] for r in rs]
        lo, hi = bootstrap_interval(scores)
        per_task = defaultdict(list)
        for r in rs:
            per_task[r["task"]].append(r["score"])
        kv = mean(r["target_kv_bytes"] for r in rs) if rs else None
        kv_full = mean(r["target_kv_bytes"] for r in full_rs) if full_rs else None
        answer_of = {(r["task"], r["seed"]): r["answer"] for r in rs}
        t = _timing_summary(ts, lambda task, seed: answer_of.get((task, seed)))
        accuracy = mean(scores) if scores else None
        rows.append({
            "profile": profile, "method": variant, "budget": budget or None, "context_tokens": context,
            "prompt_tokens": round(mean(r["prompt_tokens"] for r in (rs or ts))), "n_samples": len(rs),
            "accuracy": accuracy, "accuracy_ci": [lo, hi],
            "accuracy_se": pstdev(scores) / math.sqrt(len(scores)) if len(scores) > 1 else 0.0,
            "accuracy_vs_full": _ratio(accuracy, mean(r["score"] for r in full_rs) if full_rs else None),
            "per_task": {k: mean(v) for k, v in sorted(per_task.items())},
            **t,
            "ttft_vs_full": _ratio(t["ttft_s"], full_t["ttft_s"]), "timed_beside_full": beside_full,
            "ttft_vs_floor": _ratio(t["ttft_s"], t["ttft_floor_s"]),
            "decode_vs_full": _ratio(t["decode_tok_s"], full_t["decode_tok_s"]),
            "target_kv_bytes": kv if kv is not None else _median([x["target_kv_bytes"] for x in ts]),
            "kv_vs_full": _ratio(kv, kv_full),
            "models": models, "machine": raw[0]["machine"] if raw else machine(), "commands": commands,
            "timing_machine": timed_on.get(_timed_as((rs or ts)[0])),
        })
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "latest.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    diffs = differences(answers)
    docs = document_rows(out)
    sizes = target_rows(rows)
    (out / "latest.md").write_text(markdown(rows, targets(rows, answers), diffs, docs, sizes))
    plot(rows, out)
    plot_document(docs, out)
    if sizes:
        plot_targets(sizes, out, _pyplot())
    return rows


def reference_full(context: int, models: dict, keys: set) -> str:
    """The `full` a configuration is compared with: that of its target with
    flash attention off (on a CPU the faster `full`, so a ratio to it
    flatters no configuration), else that of its own settings (a stand-in
    timed only with flash attention on)."""
    target = {"target": models["target"]} if is_standin(models.get("target")) else {}
    plain = config_label("full", target)
    if (context, plain, 0) in keys:
        return plain
    return config_label("full", {**target, **({"flash_attn": models["flash_attn"]} if "flash_attn" in models else {})})


# pairs whose gap the report gives at every context and budget, beside each
# method against `full`: SpecKV against the heuristic it improves on, the
# cascade against its own stages, SpecPC against the other prompt methods
PAIRS = [("speckv", "snapkv"), ("speckv_pc", "specpc"), ("speckv_pc", "speckv"), ("specpc", "specprefill"),
         ("specpc", "selfinfo"), ("specpc", "headtail"), ("speckv@head", "speckv"), ("snapkv@head", "snapkv")]


def paired_gap(answers: list, a: str, b: str, context: int, budget: int) -> Optional[dict]:
    """score(a) - score(b) over the prompts both answered, with its 95%
    interval from the paired standard error (the prompts are shared, so the
    pairing removes their difficulty from the noise); None without two
    shared prompts. `full` and `draft` are matched at any budget."""
    score = defaultdict(dict)
    for r in answers:
        if r["kind"] == "answer" and r["context_tokens"] == context and (r["budget"] == budget or r["budget"] == 0):
            score[r["variant"]][(r["task"], r["seed"])] = r["score"]
    shared = sorted(set(score[a]) & set(score[b]))
    interval = paired_interval([score[a][k] - score[b][k] for k in shared])
    if interval is None:
        return None
    gap, lo, hi = interval
    verdict = f"{a} ahead" if lo > 0 else f"{b} ahead" if hi < 0 else "within noise"
    return {"context": context, "budget": budget, "a": a, "b": b, "n": len(shared), "gap": gap, "lo": lo, "hi": hi,
            "verdict": verdict}


def differences(answers: list) -> list:
    """Every method against plain `full`, a configuration (derived draft,
    flash attention) against its method as it comes, and the PAIRS, at every
    context and budget measured."""
    out = []
    for context in sorted({r["context_tokens"] for r in answers}):
        here = [r for r in answers if r["context_tokens"] == context]
        has_full = "full" in {r["variant"] for r in here}
        for budget in sorted({r["budget"] for r in here} - {0}):
            at = {r["variant"] for r in here if r["budget"] == budget}
            pairs = [(m, "full") for m in sorted(at) if has_full]
            pairs += [(a, b) for a, b in PAIRS if a in at and b in at]
            # a derived draft or flash attention against the same method as it comes
            pairs += [(m, plain) for m in sorted(at) for plain in [plain_method(m)] if plain != m and plain in at]
            out += [g for g in (paired_gap(answers, a, b, context, budget) for a, b in pairs) if g]
        if has_full:
            budgetless = sorted({r["variant"] for r in here if r["budget"] == 0} - {"full"})
            out += [g for g in (paired_gap(answers, m, "full", context, 0) for m in budgetless) if g]
    return out


def targets(rows: list, answers: list) -> list:
    """The project's accuracy, speed and memory targets, checked at the
    longest context with answers (a context timed but not yet answered, as
    32K often is, would leave the accuracy targets unmeasured): [(target,
    measured, met)], met None where not measured."""
    if not rows:
        return []
    answered = [r["context_tokens"] for r in rows if r["accuracy"] is not None]
    context = max(answered or [r["context_tokens"] for r in rows])
    by = {(r["method"], r["budget"]): r for r in rows if r["context_tokens"] == context}

    def get(method, budget, key):
        r = by.get((method, budget))
        return r[key] if r else None

    out = []
    for method, key, op, goal, label in [
            ("specpc", "ttft_vs_full", "<=", 0.65, "specpc TTFT / full's"),
            ("specpc", "ttft_vs_floor", "<=", 1.15, "specpc TTFT / its floor's"),
            ("specpc", "accuracy_vs_full", ">=", 0.9, "specpc accuracy / full's"),
            ("speckv", "kv_vs_full", "<=", 0.2, "speckv target KV / full's")]:
        v = get(method, 1024, key)
        met = None if v is None else (v <= goal if op == "<=" else v >= goal)
        out.append((f"{label} at 1024 {op} {goal}", "not measured" if v is None else f"{v:.3f}", met))
    full, spec, snap = get("full", None, "accuracy"), get("speckv", 256, "accuracy"), get("snapkv", 256, "accuracy")
    label = "speckv regains >= half of snapkv's loss to full at 256"
    if None in (full, spec, snap):
        out.append((label, "not measured", None))
    else:
        lost, regained = full - snap, spec - snap
        out.append((label, f"regains {regained:.3f} of {lost:.3f}", regained >= 0.5 * lost))
    for budget in sorted(b for m, b in by if m == "speckv" and b is not None):
        g = paired_gap(answers, "speckv", "snapkv", context, budget)
        if g is not None:
            out.append((f"speckv not below snapkv beyond noise at {budget}",
                        f"speckv - snapkv = {g['gap']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]", g["hi"] >= 0))
    return [(f"{context} tokens: {name}", shown, met) for name, shown, met in out]


def targets_table(checks: list) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for name, shown, ok in checks:
        lines.append(f"| {name} | {shown} | {'—' if ok is None else 'yes' if ok else 'no'} |")
    return "\n".join(lines)


def _fmt(v, spec, suffix=""):
    return "—" if v is None else f"{v:{spec}}{suffix}"


def _ci(r) -> str:
    if r["accuracy"] is None:
        return "—"
    lo, hi = r["accuracy_ci"]
    return f"{r['accuracy']:.3f} [{lo:.2f}, {hi:.2f}]"


def _ttft(r) -> str:
    if r["ttft_s"] is None:
        return "—"
    if r["ttft_runs"] == 1:
        return f"{r['ttft_s']:.1f} (1 run)"
    return f"{r['ttft_s']:.1f} ({r['ttft_min_s']:.1f}–{r['ttft_max_s']:.1f}, {r['ttft_runs']} runs)"


AWAY_FROM_FULL = ("‡ timed in another sitting than `full` (after a pause): its ratio to `full` is not "
                  "a side-by-side measurement (bench/README.md says how the sittings compare)")


def _ttft_vs_full(r) -> str:
    """The ratio to full's median, marked ‡ where no run of the two shared a sitting."""
    return _fmt(r["ttft_vs_full"], ".2f") + (" ‡" if r.get("timed_beside_full") is False else "")


def table(rows: list) -> str:
    head = ("| context | method | budget | n | accuracy [95% CI] | vs full | TTFT s, median (range, runs) | vs full | "
            "SpecPC floor s | decode tok/s | vs full | target KV MiB | vs full | peak RSS MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        kv = r["target_kv_bytes"]
        lines.append(
            f"| {r['context_tokens']} ({r['prompt_tokens']}) | {r['method']} | {_fmt(r['budget'], 'd')} | "
            f"{r['n_samples']} | {_ci(r)} | {_fmt(r['accuracy_vs_full'], '.2f')} | {_ttft(r)} | "
            f"{_ttft_vs_full(r)} | {_fmt(r['ttft_floor_s'], '.1f')} | "
            f"{_fmt(r['decode_tok_s'], '.1f')} | {_fmt(r['decode_vs_full'], '.2f')} | "
            f"{_fmt(kv and kv / 2**20, '.1f')} | {_fmt(r['kv_vs_full'], '.3f')} | "
            f"{_fmt(r['peak_rss_bytes'] and r['peak_rss_bytes'] / 2**20, '.0f')} |")
    return "\n".join(lines)


def accuracy_grid(rows: list) -> str:
    """Accuracy [95% interval] per method (rows) and budget (columns), one
    block per context."""
    out = []
    for c in sorted({r["context_tokens"] for r in rows if r["accuracy"] is not None}):
        rs = [r for r in rows if r["context_tokens"] == c and r["accuracy"] is not None]
        budgets = sorted({r["budget"] for r in rs if r["budget"] is not None})
        n = max((r["n_samples"] for r in rs), default=0)
        lines = [f"| {c} tokens ({n} prompts) | " + " | ".join(f"budget {b}" for b in budgets) + " |",
                 "|---" * (len(budgets) + 1) + "|"]
        def cell(r):  # a row with fewer prompts than the block's says how many
            return _ci(r) + (f", n={r['n_samples']}" if r["n_samples"] < n else "")

        for r in rs:
            if r["budget"] is None:  # answered once: the same at every budget
                lines.append(f"| {r['method']} | " + " | ".join(cell(r) for _ in budgets) + " |")
        for m in sorted({r["method"] for r in rs if r["budget"] is not None}):
            by = {r["budget"]: r for r in rs if r["method"] == m}
            lines.append(f"| {m} | " + " | ".join(cell(by[b]) if b in by else "—" for b in budgets) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def differences_table(diffs: list) -> str:
    lines = ["| context | budget | a − b | prompts | gap [95% CI] | verdict |", "|---|---|---|---|---|---|"]
    for d in diffs:
        lines.append(f"| {d['context']} | {d['budget'] or '—'} | {d['a']} − {d['b']} | {d['n']} | "
                     f"{d['gap']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] | {d['verdict']} |")
    return "\n".join(lines)


SCALED = ("full", "specpc", "speckv_pc")


def scale_table(rows: list) -> str:
    """Time to first token and memory against context length for the
    methods measured at every length (budget 1024)."""
    timed = [r for r in rows if r["method"] in SCALED and r["budget"] in (None, 1024) and r["ttft_s"] is not None]
    if not timed:
        return "Not measured yet."
    lines = ["| context | method | TTFT s, median (range, runs) | vs full | target KV MiB | peak RSS MiB |",
             "|---|---|---|---|---|---|"]
    for r in sorted(timed, key=lambda r: (r["context_tokens"], SCALED.index(r["method"]))):
        lines.append(f"| {r['context_tokens']} ({r['prompt_tokens']}) | {r['method']} | {_ttft(r)} | "
                     f"{_ttft_vs_full(r)} | {_fmt(r['target_kv_bytes'] / 2**20, '.1f')} | "
                     f"{_fmt(r['peak_rss_bytes'] and r['peak_rss_bytes'] / 2**20, '.0f')} |")
    return "\n".join(lines)


def task_table(rows: list) -> str:
    tasks = sorted({t for r in rows for t in r["per_task"]})
    lines = ["| context | method | budget | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 3) + "|"]
    for r in rows:
        if r["per_task"]:
            cells = " | ".join(_fmt(r["per_task"].get(t), ".2f") for t in tasks)
            lines.append(f"| {r['context_tokens']} | {r['method']} | {_fmt(r['budget'], 'd')} | {cells} |")
    return "\n".join(lines)


# -- the document conversation (studies/document.py's rows, in the same folder)

def document_rows(out: Path) -> list:
    """The turns of the latest run of each configuration in the folder's
    document*.jsonl files (a run starts at turn 1; a later run of a
    configuration replaces an earlier one)."""
    latest = {}
    for path in sorted(out.glob("document*.jsonl")):
        current = {}
        for r in load_runs(path):
            if "turn" not in r:
                continue
            key = (r["config"], r["tokens"], r["seed"])
            if r["turn"] == 1:
                current[key] = [r]
                if key not in latest or r["time"] >= latest[key][0]["time"]:
                    latest[key] = current[key]
            elif key in current:
                current[key].append(r)
    order = {c: i for i, c in enumerate(DOCUMENT_CONFIGS)}
    return [r for key in sorted(latest, key=lambda k: (k[1], order.get(k[0], 99), k[0])) for r in latest[key]]


DOCUMENT_CONFIGS = ["cold_full", "warm_full", "cold_specpc", "doc_specpc", "doc_speckv"]


def document_table(docs: list) -> str:
    if not docs:
        return "Not measured yet."
    n_turns = max(r["turn"] for r in docs)
    head = "| configuration | tokens | " + " | ".join(f"turn {t}" for t in range(1, n_turns + 1)) + " | right |"
    lines = [head, "|---" * (n_turns + 3) + "|"]
    for key in dict.fromkeys((r["config"], r["tokens"]) for r in docs):
        rs = {r["turn"]: r for r in docs if (r["config"], r["tokens"]) == key}
        cells = " | ".join(_fmt(rs[t]["ttft_s"] if t in rs else None, ".1f", " s") for t in range(1, n_turns + 1))
        right = sum(r["correct"] for r in rs.values())
        lines.append(f"| {key[0]} | {key[1]} | {cells} | {right}/{len(rs)} |")
    return "\n".join(lines)


def _names(rows: list, role: str) -> str:
    return ", ".join(f"`{name}`" for name in sorted({r["models"].get(role) for r in rows}))


def markdown(rows: list, checks: list = (), diffs: list = (), docs: list = (), sizes: list = ()) -> str:
    if not rows:
        return "No results yet.\n"
    r0 = rows[0]
    m = r0["machine"]
    cmds = "\n".join(f"    {c}" for c in r0["commands"])
    return (f"# Benchmark\n\n"
            f"Models: draft {_names(rows, 'draft')}, target {_names(rows, 'target')}; a method in "
            f"brackets ran with a derived draft, flash attention or a stand-in target; every method is compared "
            f"with plain `full` of its target (flash attention off, on this CPU the faster `full`), or where "
            f"that was not timed, with `full` of its own settings. "
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}.\n\nProduced by:\n\n{cmds}\n\n"
            f"Accuracy is RULER's score (fraction of expected strings in the answer), averaged over the prompts "
            f"(every task, every seed), with a 95% bootstrap interval over prompts. TTFT, decode speed and peak RSS "
            f"come from end-to-end runs on the first task's prompt, each in a process of its own, the runs of "
            f"all methods interleaved, all on one machine for each context length (`timing_machine` in "
            f"latest.jsonl): the median, the range and the number of runs (— where not timed); the "
            f"ratios to `full` are ratios of medians; {AWAY_FROM_FULL}. Target KV is what the answering model "
            f"holds when decoding starts. Context: requested length (mean prompt tokens).\n\n"
            f"## Accuracy\n\n{accuracy_grid(rows)}\n\n"
            f"## Differences between methods\n\nPaired over the same prompts: mean score difference and its 95% "
            f"interval from the paired standard error; a method is ahead only where the interval excludes "
            f"zero.\n\n{differences_table(diffs)}\n\n"
            f"## Every row\n\n{table(rows)}\n\n"
            f"## Time and memory against length\n\n{scale_table(rows)}\n\n"
            + (f"## Time to first token by target size\n\nBudget 1024; a stand-in target has the shapes and "
               f"quantization types of the model it names and random weights, so only its times count "
               f"(targets.png plots the ratios).\n\n{target_table(sizes)}\n\n" if sizes else "") +
            f"## A conversation over one document\n\nTime to first token per turn (`python -P "
            f"studies/document.py`; rows in document*.jsonl, the latest run of each configuration).\n\n"
            f"{document_table(docs)}\n\n"
            f"## Targets\n\n{targets_table(checks)}\n\n"
            f"## Accuracy per task\n\n{task_table(rows)}\n")


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'pyspec-gguf[bench]'): no plots")
        return None
    return plt


def method_styles(methods: list) -> dict:
    """One (colour, marker) per method, the same in every panel: ten colours, then a new marker."""
    colours, markers = [f"C{i}" for i in range(10)], "os^Dv"
    return {m: (colours[i % 10], markers[i // 10 % len(markers)]) for i, m in enumerate(methods)}


def plot(rows: list, out: Path) -> None:
    rows = [r for r in rows if r["accuracy"] is not None]
    if not rows or not (plt := _pyplot()):
        return
    for what in ("accuracy", "cost"):
        fig = figure(plt, rows, what)
        fig.savefig(out / f"{what}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)


def figure(plt, rows: list, what: str):
    """A panel per prompt length; one legend for the figure, since a panel may lack some methods."""
    contexts = sorted({r["context_tokens"] for r in rows})
    # Plain methods first, so that they take the ten colours and the variants the second marker.
    methods = sorted({r["method"] for r in rows if r["budget"] is not None}, key=lambda m: (plain_method(m) != m, m))
    styles = method_styles(methods)
    metrics = [("accuracy", "accuracy (RULER score, 95% CI)")] if what == "accuracy" else [
        ("ttft_s", "time to first token (s), median"), ("target_kv_bytes", "target KV (MiB)")]
    fig, axes = plt.subplots(len(metrics), len(contexts), figsize=(6 * len(contexts), 4.5 * len(metrics)),
                             squeeze=False)
    for j, c in enumerate(contexts):
        for i, (k, lab) in enumerate(metrics):
            ax = axes[i][j]
            scale = 2**20 if k == "target_kv_bytes" else 1
            for r in rows:
                if r["context_tokens"] == c and r["budget"] is None and r[k] is not None:
                    ax.axhline(r[k] / scale, linestyle="--", color="black" if r["method"] == "full" else "gray",
                               label=r["method"])
            for meth, (colour, marker) in styles.items():
                rs = sorted((r for r in rows if r["context_tokens"] == c and r["method"] == meth
                             and r[k] is not None), key=lambda r: r["budget"])
                if not rs:
                    continue
                xs, ys = [r["budget"] for r in rs], [r[k] / scale for r in rs]
                if k == "accuracy":
                    err = [[y - r["accuracy_ci"][0] for y, r in zip(ys, rs)],
                           [r["accuracy_ci"][1] - y for y, r in zip(ys, rs)]]
                    ax.errorbar(xs, ys, yerr=err, color=colour, marker=marker, capsize=2, label=meth)
                else:
                    ax.plot(xs, ys, color=colour, marker=marker, label=meth)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("budget (tokens)")
            ax.set_ylabel(lab)
            ax.set_title(f"{c} tokens")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    handles = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    return fig


def plot_document(docs: list, out: Path) -> None:
    if not docs or not (plt := _pyplot()):
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in dict.fromkeys((r["config"], r["tokens"]) for r in docs):
        rs = sorted((r for r in docs if (r["config"], r["tokens"]) == key), key=lambda r: r["turn"])
        ax.plot([r["turn"] for r in rs], [r["ttft_s"] for r in rs], marker="o", label=f"{key[0]} ({key[1]})")
    ax.set_yscale("log")
    ax.set_xlabel("turn")
    ax.set_ylabel("time to first token (s)")
    ax.set_title("questions over one document")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "document.png", dpi=110)
    plt.close(fig)
