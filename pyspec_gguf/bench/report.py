"""runs.jsonl -> latest.jsonl (one row per method, budget and context
length), latest.md (the tables) and PNG plots (with matplotlib, the `bench`
extra)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev, stdev

from ..methods.base import DEFAULT_GRANULARITY
from .common import machine


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


def _ratio(a, b):
    return a / b if a is not None and b else None


def build(runs: Path, out: Path, profile: str) -> list:
    raw = load_runs(runs)
    answers = [r for r in raw if r["kind"] == "answer"]
    timings = {(r["context_tokens"], r["variant"], r["budget"]): r for r in raw if r["kind"] == "timing"}
    groups = defaultdict(list)
    for r in answers:
        groups[(r["context_tokens"], r["variant"], r["budget"])].append(r)
    commands = sorted({r["command"] for r in raw})
    models = raw[0]["models"] if raw else {}
    rows = []
    for (context, variant, budget), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        full_rs = groups.get((context, "full", 0), [])
        full_t = timings.get((context, "full", 0))
        t = timings.get((context, variant, budget))
        scores = [r["score"] for r in rs]
        per_task = defaultdict(list)
        for r in rs:
            per_task[r["task"]].append(r["score"])
        kv = mean(r["target_kv_bytes"] for r in rs)
        kv_full = mean(r["target_kv_bytes"] for r in full_rs) if full_rs else None
        ttft = t["ttft_s"] if t else None
        decode = t["decode_tok_s"] if t else None
        floor = t["floor"]["floor_s"] if t and "floor" in t else None
        fork = next((r for r in rs if r["task"] == t["task"] and r["seed"] == t["seed"]), None) if t else None
        rows.append({
            "profile": profile, "method": variant, "budget": budget or None, "context_tokens": context,
            "prompt_tokens": round(mean(r["prompt_tokens"] for r in rs)), "n_samples": len(rs),
            "accuracy": mean(scores),
            "accuracy_se": pstdev(scores) / math.sqrt(len(scores)) if len(scores) > 1 else 0.0,
            "accuracy_vs_full": _ratio(mean(scores), mean(r["score"] for r in full_rs) if full_rs else None),
            "per_task": {k: mean(v) for k, v in sorted(per_task.items())},
            "ttft_s": ttft, "ttft_vs_full": _ratio(ttft, full_t["ttft_s"] if full_t else None),
            "ttft_floor_s": floor, "ttft_vs_floor": _ratio(ttft, floor),
            "decode_tok_s": decode, "decode_vs_full": _ratio(decode, full_t["decode_tok_s"] if full_t else None),
            "target_kv_bytes": kv, "kv_vs_full": _ratio(kv, kv_full),
            "peak_rss_bytes": t["peak_rss_bytes"] if t else None,
            "stage_times": t["times"] if t else None,
            # the end-to-end run answers the timed prompt as the shared-prefill fork did
            "timed_answer_matches": (fork["answer"] == t["answer"]) if fork and t else None,
            "models": models, "machine": raw[0]["machine"] if raw else machine(), "commands": commands,
        })
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "latest.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (out / "latest.md").write_text(markdown(rows, targets(rows, answers)))
    plot(rows, out)
    return rows


def _plain(method: str) -> str:
    """A plain method name means its default granularity."""
    return f"{method}@{DEFAULT_GRANULARITY}" if method in ("speckv", "snapkv") else method


def paired_gap(answers: list, a: str, b: str, context: int, budget: int) -> tuple:
    """Mean of score(a) - score(b) over the prompts both answered, and its
    standard error (the prompts are shared, so the pairing removes their
    difficulty from the noise)."""
    score = defaultdict(dict)
    for r in answers:
        if r["kind"] == "answer" and r["context_tokens"] == context and r["budget"] == budget:
            score[r["variant"]][(r["task"], r["seed"])] = r["score"]
    shared = sorted(set(score[_plain(a)]) & set(score[_plain(b)]))
    gaps = [score[_plain(a)][k] - score[_plain(b)][k] for k in shared]
    if len(gaps) < 2:
        return (gaps[0] if gaps else None), None
    return mean(gaps), stdev(gaps) / math.sqrt(len(gaps))


def targets(rows: list, answers: list) -> list:
    """The project's accuracy, speed and memory targets, checked at the
    longest context measured: [(target, measured, met)], met None where not
    measured. `speckv` and `snapkv` are their default granularity."""
    if not rows:
        return []
    context = max(r["context_tokens"] for r in rows)
    by = {(r["method"], r["budget"]): r for r in rows if r["context_tokens"] == context}

    def get(method, budget, key):
        r = by.get((_plain(method), budget))
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
    for budget in sorted(b for m, b in by if m == _plain("speckv") and b is not None):
        gap, se = paired_gap(answers, "speckv", "snapkv", context, budget)
        if gap is not None:
            noise = 2 * se if se is not None else 0.0
            out.append((f"speckv not below snapkv beyond noise at {budget}",
                        f"speckv - snapkv = {gap:+.3f} (noise {noise:.3f})", gap >= -noise))
    return [(f"{context} tokens: {name}", shown, met) for name, shown, met in out]


def targets_table(checks: list) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for name, shown, ok in checks:
        lines.append(f"| {name} | {shown} | {'—' if ok is None else 'yes' if ok else 'no'} |")
    return "\n".join(lines)


def _fmt(v, spec, suffix=""):
    return "—" if v is None else f"{v:{spec}}{suffix}"


def table(rows: list) -> str:
    head = ("| context | method | budget | accuracy | vs full | TTFT s | vs full | SpecPC floor s | decode tok/s | "
            "vs full | target KV MiB | vs full | peak RSS MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['context_tokens']} ({r['prompt_tokens']}) | {r['method']} | {_fmt(r['budget'], 'd')} | "
            f"{r['accuracy']:.2f} ± {r['accuracy_se']:.2f} | {_fmt(r['accuracy_vs_full'], '.2f')} | "
            f"{_fmt(r['ttft_s'], '.1f')} | {_fmt(r['ttft_vs_full'], '.2f')} | {_fmt(r['ttft_floor_s'], '.1f')} | "
            f"{_fmt(r['decode_tok_s'], '.1f')} | {_fmt(r['decode_vs_full'], '.2f')} | "
            f"{r['target_kv_bytes'] / 2**20:.1f} | {_fmt(r['kv_vs_full'], '.3f')} | "
            f"{_fmt(r['peak_rss_bytes'] and r['peak_rss_bytes'] / 2**20, '.0f')} |")
    return "\n".join(lines)


def accuracy_grid(rows: list) -> str:
    """Accuracy per method (rows) and budget (columns), one block per context."""
    out = []
    for c in sorted({r["context_tokens"] for r in rows}):
        rs = [r for r in rows if r["context_tokens"] == c]
        budgets = sorted({r["budget"] for r in rs if r["budget"] is not None})
        full = next((r for r in rs if r["method"] == "full"), None)
        lines = [f"| {c} tokens | " + " | ".join(f"budget {b}" for b in budgets) + " |",
                 "|---" * (len(budgets) + 1) + "|"]
        if full:
            lines.append("| full | " + " | ".join(f"{full['accuracy']:.3f}" for _ in budgets) + " |")
        for m in sorted({r["method"] for r in rs} - {"full"}):
            acc = {r["budget"]: r["accuracy"] for r in rs if r["method"] == m}
            lines.append(f"| {m} | " + " | ".join(_fmt(acc.get(b), ".3f") for b in budgets) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def task_table(rows: list) -> str:
    tasks = sorted({t for r in rows for t in r["per_task"]})
    lines = ["| context | method | budget | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 3) + "|"]
    for r in rows:
        cells = " | ".join(_fmt(r["per_task"].get(t), ".2f") for t in tasks)
        lines.append(f"| {r['context_tokens']} | {r['method']} | {_fmt(r['budget'], 'd')} | {cells} |")
    return "\n".join(lines)


def markdown(rows: list, checks: list = ()) -> str:
    if not rows:
        return "No results yet.\n"
    r0 = rows[0]
    m = r0["machine"]
    cmds = "\n".join(f"    {c}" for c in r0["commands"])
    return (f"# Benchmark ({r0['profile']} profile)\n\n"
            f"Models: draft `{r0['models'].get('draft')}`, target `{r0['models'].get('target')}`. "
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}.\n\nProduced by:\n\n{cmds}\n\n"
            f"Accuracy is RULER's score (fraction of expected strings in the answer), averaged over tasks and "
            f"samples (± its standard error); TTFT, decode speed and peak RSS come from one end-to-end run per "
            f"row on the first task's prompt (— where not timed); target KV is what the target holds when "
            f"decoding starts. Context: requested length (mean prompt tokens).\n\n"
            f"{accuracy_grid(rows)}\n\n{table(rows)}\n\n## Targets\n\n`speckv` and `snapkv` are their default granularity "
            f"(`@{DEFAULT_GRANULARITY}`); the noise of a gap between two methods is twice the standard error of "
            f"their score difference over the same prompts.\n\n{targets_table(checks)}\n\n"
            f"## Accuracy per task\n\n{task_table(rows)}\n")


def plot(rows: list, out: Path) -> None:
    if not rows:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'pyspec-gguf[bench]'): no plots")
        return
    contexts = sorted({r["context_tokens"] for r in rows})
    methods = sorted({r["method"] for r in rows if r["method"] != "full"})
    for what, key, label, name in [("accuracy", "accuracy", "accuracy (RULER score)", "accuracy.png"),
                                   ("cost", None, None, "cost.png")]:
        n_rows = 1 if what == "accuracy" else 2
        fig, axes = plt.subplots(n_rows, len(contexts), figsize=(5 * len(contexts), 4 * n_rows), squeeze=False)
        for j, c in enumerate(contexts):
            metrics = [(key, label)] if what == "accuracy" else [("ttft_s", "time to first token (s)"),
                                                                 ("target_kv_bytes", "target KV (MiB)")]
            for i, (k, lab) in enumerate(metrics):
                ax = axes[i][j]
                scale = 2**20 if k == "target_kv_bytes" else 1
                full = next((r for r in rows if r["context_tokens"] == c and r["method"] == "full"), None)
                if full and full[k] is not None:
                    ax.axhline(full[k] / scale, color="black", linestyle="--", label="full")
                for meth in methods:
                    pts = sorted((r["budget"], r[k] / scale) for r in rows
                                 if r["context_tokens"] == c and r["method"] == meth and r[k] is not None)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=meth)
                ax.set_xscale("log", base=2)
                ax.set_xlabel("budget (tokens)")
                ax.set_ylabel(lab)
                ax.set_title(f"{c} tokens")
                ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
