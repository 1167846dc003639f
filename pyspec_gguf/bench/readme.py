"""The benchmark's results section, rebuilt from the results so that every
figure and every "ahead" in it comes from runs.jsonl:

    pyspec-gguf bench --report --readme bench/README.md

rewrites the part of bench/README.md between BEGIN and END (a test checks
that the committed file matches the committed results). Per context length
that has `full` answers: the accuracy grid of the methods at their
defaults, the paired differences the README discusses, and the timing."""

from __future__ import annotations

from pathlib import Path

from .report import AWAY_FROM_FULL, _ci, _fmt, _ttft, _ttft_vs_full, accuracy_grid, paired_gap

BEGIN = "<!-- results: begin (rebuilt by `pyspec-gguf bench --report --readme bench/README.md`) -->"
END = "<!-- results: end -->"

# the comparisons the README draws, (a, b) for a − b: what SpecKV and the
# cascade add to the heuristics they build on, SpecPC against its peer on
# llama.cpp, then every method against keeping the whole prompt
PAIRS = [("speckv", "snapkv"), ("speckv_pc", "specpc"), ("speckv_pc", "speckv"), ("specpc", "specprefill")]
AGAINST_FULL = ["speckv", "speckv_pc", "specpc", "snapkv", "specprefill", "draft", "streamingllm", "headtail",
                "selfinfo"]


def _plain(method: str) -> bool:
    """A method at its defaults: no derived draft, option or per-head keeping."""
    return "[" not in method and "@" not in method


def _gap(g: dict) -> str:
    return f"{g['gap']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]"


def comparison(answers: list, a: str, b: str, context: int, budgets: list) -> str:
    """One line: a − b at each budget, budgets grouped by verdict. An "ahead"
    carries its interval; "within noise" names its budgets only (latest.md
    has every interval), which keeps the README, the first command's
    document, short."""
    gaps = [g for g in (paired_gap(answers, a, b, context, budget) for budget in budgets) if g]
    if not gaps:
        return ""
    parts = []
    for verdict in dict.fromkeys(g["verdict"] for g in gaps):
        at = [g for g in gaps if g["verdict"] == verdict]
        if verdict == "within noise":
            where = ", ".join(str(g["budget"]) for g in at if g["budget"])  # "" for `draft`, which has no budget
        else:
            where = ", ".join(f"{g['budget']} ({_gap(g)})" if g["budget"] else _gap(g) for g in at)
        parts.append(f"{verdict} at {where}" if at[0]["budget"] else f"{verdict} {where}".rstrip())
    n = sorted({g["n"] for g in gaps})
    prompts = f"{n[0]}" if len(n) == 1 else f"{n[0]}–{n[-1]}"
    return f"- `{a}` − `{b}` ({prompts} prompts): " + "; ".join(parts) + "."


def timing_table(rows: list) -> str:
    timed = [r for r in rows if r["ttft_s"] is not None]
    if not timed:
        return "Time to first token: not measured at this length yet."
    lines = ["| method | budget | TTFT s, median (range, runs) | vs full | SpecPC floor s | decode tok/s | "
             "target KV MiB | peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in timed:
        lines.append(f"| {r['method']} | {_fmt(r['budget'], 'd')} | {_ttft(r)} | {_ttft_vs_full(r)} | "
                     f"{_fmt(r['ttft_floor_s'], '.1f')} | {_fmt(r['decode_tok_s'], '.1f')} | "
                     f"{_fmt(r['target_kv_bytes'] / 2**20, '.1f')} | "
                     f"{_fmt(r['peak_rss_bytes'] and r['peak_rss_bytes'] / 2**20, '.0f')} |")
    machine = timed[0]["timing_machine"]
    away = f"\n\n{AWAY_FROM_FULL}." if any(r.get("timed_beside_full") is False for r in timed) else ""
    return (f"Time to first token and memory: end-to-end runs, each in a process of its own, interleaved, "
            f"on {machine}.\n\n" + "\n".join(lines) + away)


def section(rows: list, answers: list, prompts_planned: dict) -> str:
    """The README's results, one part per context length with `full` answers;
    prompts_planned: context length -> the prompts its profile plans."""
    out = []
    for context in sorted({r["context_tokens"] for r in rows}):
        here = [r for r in rows if r["context_tokens"] == context and _plain(r["method"])]
        full = next((r for r in here if r["method"] == "full" and r["n_samples"]), None)
        if full is None:
            continue
        n = max(r["n_samples"] for r in here)
        budgets = sorted({r["budget"] for r in here if r["budget"]})
        # the accuracy prompts' length: timing-only rows time one prompt of their own
        answered = [r for r in here if r["n_samples"]]
        prompt_tokens = round(sum(r["prompt_tokens"] for r in answered) / len(answered))
        models = full["models"]
        of = f" of {prompts_planned[context]}" if context in prompts_planned else ""
        out.append(
            f"### {context} tokens: {n}{of} prompts\n\n"
            f"Draft `{models.get('draft')}`, target `{models.get('target')}`, {prompt_tokens:,} prompt tokens on average; "
            f"RULER score, mean over prompts [95% bootstrap interval], `n=` where a method has answered fewer "
            f"prompts than the others so far. `full` keeps the whole prompt ({_ci(full)}).\n\n"
            f"{accuracy_grid(here)}\n\n"
            f"Paired differences (the same prompts; 95% interval of the mean difference; \"ahead\" only where it "
            f"excludes zero; `bench/results/latest.md` gives the interval of every gap within noise too):\n\n"
            + "\n".join(line for line in
                        [comparison(answers, a, b, context, budgets) for a, b in PAIRS]
                        + [comparison(answers, m, "full", context, [0] if m == "draft" else budgets)
                           for m in AGAINST_FULL] if line)
            + f"\n\n{timing_table(here)}")
    return "\n\n".join(out) or "No results yet."


def _parts(readme: Path) -> tuple:
    """(before BEGIN, between the markers, after END) of `readme`."""
    content = readme.read_text(encoding="utf-8")
    if content.count(BEGIN) != 1 or content.count(END) != 1 or content.index(BEGIN) > content.index(END):
        raise ValueError(f"{readme}: needs one {BEGIN!r} line and, after it, one {END!r} line")
    head, rest = content.split(BEGIN)
    body, tail = rest.split(END)
    return head, body, tail


def current(readme: Path) -> str:
    """The section as it stands in `readme` (checks its markers)."""
    return _parts(readme)[1].strip()


def update(readme: Path, text: str) -> None:
    """Replace what lies between BEGIN and END in `readme` with `text`."""
    head, _, tail = _parts(readme)
    readme.write_text(f"{head}{BEGIN}\n\n{text}\n\n{END}{tail}", encoding="utf-8")
