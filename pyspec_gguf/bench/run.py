"""Accuracy, speed and memory of every method side by side.

    pyspec-gguf bench --profile full        # the Qwen pair, 4K and 8K tokens
    pyspec-gguf bench --profile quick       # SmolLM2 as draft and target, minutes

For each context length, every task and sample gives one prompt; one draft
pass and one target prefill of it answer every (method, budget) variant
(`forks.py`). Time to first token, decode speed, KV bytes and peak RSS come
from end-to-end runs of each method in a process of its own (`single.py`)
on the first task's prompt; for SpecPC also its floor. Every result is
appended to runs.jsonl as it comes, so an interrupted run resumes where it
stopped; latest.jsonl, latest.md and the plots are rebuilt from it at the end
(or alone with --report).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .. import registry
from ..session import SpecSession
from . import report
from .common import append_result
from .forks import VARIANTS, PromptForks
from .tasks import TASKS, make_task


@dataclass
class Profile:
    contexts: list
    budgets: list
    tasks: list
    samples: int
    draft: str = ""        # registry default
    target: str = ""
    timed: dict = field(default_factory=dict)  # variant -> budgets timed end to end (default: all)
    out: str = "bench/results"


PROFILES = {
    "quick": Profile(contexts=[1024], budgets=[128, 256], tasks=["niah_single", "niah_multikey", "variable_tracking",
                                                                 "qa"], samples=1,
                     draft="smollm2-135m-instruct-q4_1", target="smollm2-135m-instruct-q4_1",
                     out="bench/results/quick"),
    # Fits a few hours on 2 CPU cores: a KV method's time to first token is
    # its full target prefill at any budget, so those are timed at 1024 only.
    "full": Profile(contexts=[4096, 8192], budgets=[256, 512, 1024, 2048], tasks=list(TASKS), samples=1,
                    timed={v: [1024] for v in VARIANTS if v not in ("full", "specpc")}),
}


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=list(PROFILES), default="full")
    p.add_argument("--out", help="results folder (default: the profile's)")
    p.add_argument("--contexts", help="context lengths in tokens, comma-separated (default: the profile's)")
    p.add_argument("--budgets", help="budgets, comma-separated (default: the profile's)")
    p.add_argument("--tasks", help=f"tasks, comma-separated, of: {', '.join(TASKS)}")
    p.add_argument("--samples", type=int, help="prompts per task and context length")
    p.add_argument("--variants", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--report", action="store_true", help="only rebuild latest.jsonl, the table and the plots")


def _csv(value, cast=str):
    return [cast(v) for v in value.split(",")] if value else None


def resolve(args) -> tuple[Profile, list]:
    prof = PROFILES[args.profile]
    prof = Profile(**{**prof.__dict__})
    prof.contexts = _csv(args.contexts, int) or prof.contexts
    prof.budgets = _csv(args.budgets, int) or prof.budgets
    prof.tasks = _csv(args.tasks) or prof.tasks
    prof.samples = args.samples or prof.samples
    prof.out = args.out or prof.out
    variants = _csv(args.variants) or list(VARIANTS)
    for name in prof.tasks:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; variants: {', '.join(VARIANTS)}")
    if any(b < 1 for b in prof.budgets) or any(c < 64 for c in prof.contexts) or prof.samples < 1:
        raise ValueError("budgets must be >= 1, context lengths >= 64 and samples >= 1")
    return prof, variants


def _done(path: Path) -> set:
    return {_key(row) for row in report.load_runs(path)}


def _key(row: dict) -> tuple:
    if row["kind"] == "answer":
        return ("answer", row["context_tokens"], row["task"], row["seed"], row["variant"], row["budget"])
    return ("timing", row["context_tokens"], row["variant"], row["budget"])


def main(args) -> int:
    prof, variants = resolve(args)
    out = Path(prof.out)
    runs = out / "runs.jsonl"
    if not args.report:
        measure(prof, variants, runs)
    rows = report.build(runs, out, args.profile)
    print(report.table(rows))
    return 0


def measure(prof: Profile, variants: list, runs: Path) -> None:
    draft = prof.draft or registry.default_model("draft")
    target = prof.target or registry.default_model("target")
    models = {"draft": draft, "target": target}
    done = _done(runs)
    timed = [(v, b) for v in variants for b in ([0] if v == "full" else prof.timed.get(v, prof.budgets))]
    prompts = [(t, s) for s in range(prof.samples) for t in prof.tasks]
    bar = tqdm(total=len(prof.contexts) * (len(prompts) + len(timed)), desc="bench", unit="run", dynamic_ncols=True)
    for context in prof.contexts:
        with SpecSession(draft=draft, target=target, progress=False) as session:
            for task_name, seed in prompts:
                base = {"kind": "answer", "models": models, "context_tokens": context, "task": task_name,
                        "seed": seed}
                todo = [(v, b) for v in variants for b in ([0] if v == "full" else prof.budgets)
                        if _key({**base, "variant": v, "budget": b}) not in done]
                if todo:
                    bar.set_postfix_str(f"{task_name} @ {context}")
                    answer_prompt(session, base, todo, runs)
                bar.update()
        # end-to-end timing runs, each in a fresh process, once the models are released here
        for variant, budget in timed:
            row = {"kind": "timing", "models": models, "context_tokens": context, "variant": variant,
                   "budget": budget, "task": prof.tasks[0], "seed": 0}
            if _key(row) not in done:
                bar.set_postfix_str(f"time {variant} {budget} @ {context}")
                row.update(time_one(draft, target, variant, budget or 10**9, context, prof.tasks[0]))
                append_result(runs, row)
            bar.update()
    bar.close()


def answer_prompt(session, base: dict, todo: list, runs: Path) -> None:
    task = make_task(base["task"], session.target, base["context_tokens"], base["seed"])
    tokens = session.tokenize(task.messages)
    protected = session.protected_positions(tokens, session.template_tail(task.messages, tokens))
    forks = PromptForks(session, tokens, protected, task.max_tokens, variants=list(dict.fromkeys(v for v, _ in todo)))
    try:
        for variant, budget in todo:
            text, cells = forks.answer(variant, budget or len(tokens))
            append_result(runs, {**base, "variant": variant, "budget": budget, "prompt_tokens": len(tokens),
                                 "expected": task.expected, "answer": text, "score": task.score(text),
                                 "kv_cells": cells, "target_kv_bytes": cells * session.target.kv_bytes_per_token})
    finally:
        forks.close()


def time_one(draft: str, target: str, variant: str, budget: int, context: int, task: str) -> dict:
    cmd = [sys.executable, "-m", "pyspec_gguf.bench.single", "--draft", draft, "--target", target,
           "--method", variant, "--budget", str(budget), "--tokens", str(context), "--task", task]
    if variant == "specpc":
        cmd.append("--floor")
    # run outside any source tree, so the installed package (with its extension) is imported
    with tempfile.TemporaryDirectory(prefix="pyspec-bench-") as cwd:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ})
    if done.returncode != 0:
        raise RuntimeError(f"timing run failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pyspec_gguf.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(p)
    return p


if __name__ == "__main__":
    sys.exit(main(parser().parse_args()))
