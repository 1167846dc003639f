"""Time to first token by target size: the rows of one results folder that
time the same methods on several targets (the real one and stand-ins),
as a table and a plot of each method's ratio to `full` against the
target's size, one line per prompt length."""

from __future__ import annotations

import re
from pathlib import Path

from .standin import is_standin

METHODS = ("specpc", "speckv_pc")


def target_size(target: str) -> float:
    """A target's size in billions of parameters, from its name
    ("qwen2.5-coder-1.5b-instruct-q4_k_m", "standin:qwen2.5-7b")."""
    m = re.search(r"(\d+(?:\.\d+)?)b\b", target.lower().replace("_", "-"))
    return float(m.group(1)) if m else float("nan")


def _method(row: dict) -> str:
    return row["method"].split(" [")[0]


def target_rows(rows: list) -> list:
    """One row per (target, context) with `full` and the METHODS timed at
    budget 1024: their TTFT, ratio to `full`, the draft's share of SpecPC's
    time, target KV and peak RSS. Empty unless two targets were timed."""
    timed = [r for r in rows if r["ttft_s"] is not None and r["budget"] in (None, 1024)
             and _method(r) in ("full", *METHODS)]
    if len({r["models"].get("target") for r in timed}) < 2:
        return []
    out = {}
    for r in timed:
        key = (r["models"].get("target", "?"), r["context_tokens"])
        entry = out.setdefault(key, {"target": key[0], "size_b": target_size(key[0]), "context_tokens": key[1],
                                     "standin": is_standin(key[0]), "prompt_tokens": r["prompt_tokens"]})
        entry[_method(r)] = r
    return sorted(out.values(), key=lambda e: (e["context_tokens"], e["size_b"]))


def _cell(row, key: str, spec: str, scale: float = 1) -> str:
    value = row.get(key) if row else None
    return "—" if value is None else f"{value / scale:{spec}}"


def _runs(row) -> str:
    if row is None:
        return "—"
    n = row["ttft_runs"]
    spread = f", {row['ttft_min_s']:.0f}–{row['ttft_max_s']:.0f}" if n > 1 else ""
    return f"{row['ttft_s']:.1f} ({n} run{'s' * (n > 1)}{spread})"


def target_table(entries: list) -> str:
    if not entries:
        return "Not measured yet."
    # each target and length is timed on one machine; name it where they differ
    several = len({_machine(e) for e in entries} - {None}) > 1
    lines = ["| target | context | `full` TTFT s | `specpc` | vs full | draft's share | `speckv_pc` | vs full | "
             "target KV MiB full → specpc | peak RSS MiB full / specpc |" + " timed on |" * several,
             "|" + "---|" * (10 + several)]
    for e in entries:
        full, pc, cascade = e.get("full"), e.get("specpc"), e.get("speckv_pc")
        share = None
        if pc and pc.get("stage_times"):
            share = (pc["stage_times"].get("draft_prefill", 0) + pc["stage_times"].get("lookahead", 0)) / pc["ttft_s"]
        name = e["target"] + (" (stand-in: times only)" if e["standin"] else "")
        lines.append(
            f"| {name} | {e['context_tokens']} | {_runs(full)} | {_runs(pc)} | {_cell(pc, 'ttft_vs_full', '.2f')} | "
            f"{'—' if share is None else f'{share:.0%}'} | {_runs(cascade)} | "
            f"{_cell(cascade, 'ttft_vs_full', '.2f')} | {_cell(full, 'target_kv_bytes', '.0f', 2**20)} → "
            f"{_cell(pc, 'target_kv_bytes', '.0f', 2**20)} | {_cell(full, 'peak_rss_bytes', '.0f', 2**20)} / "
            f"{_cell(pc, 'peak_rss_bytes', '.0f', 2**20)} |" + (f" {_machine(e) or '—'} |" if several else ""))
    return "\n".join(lines)


def _machine(entry: dict):
    row = entry.get("full") or entry.get("specpc") or entry.get("speckv_pc")
    return row.get("timing_machine") if row else None


def plot_targets(entries: list, out: Path, plt) -> None:
    """targets.png: each method's TTFT ratio to `full` against target size
    (log scale), a line per prompt length, of one colour in every panel."""
    if not entries or plt is None:
        return
    fig, axes = plt.subplots(1, len(METHODS), figsize=(6 * len(METHODS), 4.5), squeeze=False)
    for ax, method in zip(axes[0], METHODS):
        for i, context in enumerate(sorted({e["context_tokens"] for e in entries})):
            points = sorted((e["size_b"], e[method]["ttft_vs_full"]) for e in entries
                            if e["context_tokens"] == context and e.get(method) and e[method]["ttft_vs_full"])
            if points:
                ax.plot(*zip(*points), marker="os^D"[i % 4], color=f"C{i}", label=f"{context} tokens")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        sizes = sorted({e["size_b"] for e in entries})
        ax.set_xticks(sizes, [f"{s:g}B" for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("target size (billions of parameters; above 1.5B a stand-in, timed only)")
        ax.set_ylabel(f"{method} TTFT / full TTFT")
        ax.set_title(f"{method}, budget 1024")
        ax.set_ylim(0, 1.1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "targets.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
