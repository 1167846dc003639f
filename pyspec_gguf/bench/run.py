"""Accuracy, speed and memory of every method side by side.

    pyspec-gguf bench --profile full        # the Qwen pair, 4K and 8K tokens, 5 prompts per task
    pyspec-gguf bench --profile long        # the Qwen pair at 16K tokens, the main methods
    pyspec-gguf bench --profile scale       # one 32K prompt: time and memory of full, specpc, speckv_pc
    pyspec-gguf bench --profile perhead     # SpecKV and SnapKV keeping entries per KV head
    pyspec-gguf bench --profile quick       # SmolLM2 as draft and target, minutes

For each context length, every task and sample gives one prompt; one draft
pass and one target prefill of it answer every (method, budget) variant
(`forks.py`). Time to first token, decode speed, KV bytes and peak RSS come
from end-to-end runs of each method in a process of its own (`single.py`)
on the first task's prompt, repeated and interleaved (full, specpc, ...,
full, specpc, ...) so that the machine's drift hits every method alike; for
SpecPC also its floor. Every result is appended to runs.jsonl as it comes,
so an interrupted run resumes where it stopped; latest.jsonl, latest.md and
the plots are rebuilt from it at the end (or alone with --report; with
--readme also the README's results section, `readme.py`). The
profiles share one results folder, so the report puts them side by side.
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
from .._log import logger as log
from ..derive import derived_draft
from ..methods import make_method, parse_option
from ..session import SpecSession
from . import readme, report, standin
from .common import append_result, machine, machine_label
from .forks import VARIANTS, PromptForks

# timed end to end only: auto answers as the method it chooses does
TIMING_ONLY = ("auto",)
from .tasks import TASKS, make_task

# every method at its default options (speckv, snapkv: one KV set per token)
MAIN = ["full", "specpc", "speckv", "snapkv", "speckv_pc", "streamingllm", "specprefill", "selfinfo", "headtail",
        "draft"]
# answered once per prompt: their answer does not depend on a budget
BUDGETLESS = ("full", "draft")


@dataclass
class Profile:
    contexts: list
    budgets: list
    tasks: list
    samples: int
    variants: list
    timed: dict                  # variant -> budgets timed end to end (0 for a budgetless one)
    timing_runs: int = 3         # end-to-end runs of each timed variant, interleaved
    options: dict = field(default_factory=dict)  # method name -> its options other than the defaults
    draft: str = ""              # registry default
    target: str = ""
    out: str = "bench/results"


def _at(variants, budgets) -> dict:
    return {v: [0] if v in BUDGETLESS else list(budgets) for v in variants}


PROFILES = {
    "quick": Profile(contexts=[1024], budgets=[128, 256], tasks=["niah_single", "niah_multikey", "variable_tracking",
                                                                 "qa"], samples=1, variants=list(VARIANTS),
                     # timed: the methods the README compares on time (each run is a process)
                     timed={**_at(["full", "speckv", "speckv_pc"], [256]), "specpc": [128, 256]}, timing_runs=2,
                     draft="smollm2-135m-instruct-q4_1", target="smollm2-135m-instruct-q4_1",
                     out="bench/results/quick"),
    # Days on 2 CPU cores, resumable: 8 tasks x 5 seeds at 4K and 8K, every
    # method at every budget; timing at 1024 (a KV method's time to first
    # token is its full target prefill at any budget) and SpecPC at each.
    "full": Profile(contexts=[4096, 8192], budgets=[256, 512, 1024, 2048], tasks=list(TASKS), samples=5,
                    variants=MAIN, timed={**_at(MAIN, [1024]), "specpc": [256, 512, 1024, 2048]}),
    "long": Profile(contexts=[16384], budgets=[1024], tasks=list(TASKS), samples=2,
                    variants=["full", "specpc", "speckv", "speckv_pc", "snapkv"],
                    timed=_at(["full", "specpc", "speckv_pc"], [1024])),
    # one prompt, one timing run per method: a 32K target prefill alone is
    # most of an hour on 2 CPU cores. 32,512 requested tokens make a
    # 32,498-token prompt, which with the answer fits the Qwen models'
    # 32,768 trained positions
    "scale": Profile(contexts=[32512], budgets=[1024], tasks=["niah_single"], samples=1,
                     variants=["full", "specpc", "speckv_pc"], timed=_at(["full", "specpc", "speckv_pc"], [1024]),
                     timing_runs=1),
    # per-head eviction (the paper's), beside `full` (a decode from the same
    # target pass); not timed: it costs what the one-set variant costs plus
    # the state rewrite, which bench/README.md measures
    "perhead": Profile(contexts=[4096, 8192], budgets=[256, 512, 1024, 2048], tasks=list(TASKS), samples=5,
                       variants=["full", "speckv@head", "snapkv@head"], timed={}),
}


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=list(PROFILES), default="full")
    p.add_argument("--out", help="results folder (default: the profile's)")
    p.add_argument("--contexts", help="context lengths in tokens, comma-separated (default: the profile's)")
    p.add_argument("--budgets", help="budgets, comma-separated (default: the profile's)")
    p.add_argument("--tasks", help=f"tasks, comma-separated, of: {', '.join(TASKS)}")
    p.add_argument("--samples", type=int, help="prompts per task and context length")
    p.add_argument("--variants", help=f"comma-separated, of: {', '.join(VARIANTS)}, and auto with --only timing "
                                      "(default: the profile's)")
    p.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method's option other than its default, e.g. specpc.lookahead=1 (repeatable; "
                        "the rows name it, so they resume and report apart from the defaults' rows)")
    p.add_argument("--timing-runs", type=int, help="end-to-end runs of each timed variant (default: the profile's)")
    p.add_argument("--only", choices=["answers", "timing"], help="measure only the accuracy or only the timing side")
    p.add_argument("--retime", action="store_true",
                   help="time the timed variants again even where runs.jsonl holds their runs: the report then "
                        "takes each one's runs from this sitting on (runs.jsonl keeps the earlier ones)")
    p.add_argument("--draft", help="draft model (default: the profile's)")
    p.add_argument("--target", help="target model (default: the profile's); standin:qwen2.5-3b, -7b or -14b "
                   "times a target of that model's shapes with random weights, made once from the default target's "
                   "file (timing only: its answers are noise and are never scored)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("--flash-attn", choices=["off", "on", "auto"], default="off",
                   help="flash attention in every context (default: off, as in the committed results, so that "
                        "new rows compare with them; rows with another setting are labelled in the report)")
    p.add_argument("--draft-quant", default=None, metavar="TYPE", help="the draft requantized (cached), e.g. q4_0")
    p.add_argument("--draft-layers", type=int, default=0, metavar="K", help="the draft cut to its first K layers")
    p.add_argument("--report", action="store_true", help="only rebuild latest.jsonl, the tables and the plots")
    p.add_argument("--readme", metavar="PATH", help="also rewrite the results section of this README (between "
                   "its results markers) from the results")


def _csv(value, cast=str):
    return [cast(v) for v in value.split(",")] if value else None


def resolve(args) -> Profile:
    prof = PROFILES[args.profile]
    prof = Profile(**{**prof.__dict__})
    prof.contexts = _csv(args.contexts, int) or prof.contexts
    prof.budgets = _csv(args.budgets, int) or prof.budgets
    prof.tasks = _csv(args.tasks) or prof.tasks
    prof.samples = args.samples or prof.samples
    prof.out = args.out or prof.out
    prof.draft = args.draft or prof.draft
    prof.target = args.target or prof.target
    if args.timing_runs is not None:
        prof.timing_runs = args.timing_runs
    if args.variants:
        prof.variants = _csv(args.variants)
        prof.timed = {v: b for v, b in prof.timed.items() if v in prof.variants}
    prof.options = parse_method_options(args.option)
    if standin.is_standin(prof.target):
        standin.check_standin(prof.target)
        if args.only == "answers":
            raise ValueError(f"{prof.target} is timed only: its answers are noise (drop --only answers)")
    for name in prof.tasks:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    for v in prof.variants:
        if v in TIMING_ONLY:
            if args.only != "timing":
                raise ValueError(f"{v} is timed only (it answers as full or specpc does): add --only timing")
            prof.timed.setdefault(v, list(prof.budgets))
        elif v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; variants: {', '.join(VARIANTS + TIMING_ONLY)}")
    unused = set(prof.options) - {v.partition("@")[0] for v in prof.variants}
    if unused:
        raise ValueError(f"--option for {', '.join(sorted(unused))}, which no variant runs")
    if (any(b < 1 for b in prof.budgets) or any(c < 64 for c in prof.contexts) or prof.samples < 1
            or prof.timing_runs < 0):
        raise ValueError("budgets must be >= 1, context lengths >= 64, samples >= 1 and timing runs >= 0")
    return prof


def parse_method_options(texts: list) -> dict:
    """["specpc.lookahead=1", ...] -> {"specpc": {"lookahead": 1}}, each
    method built once with its options so a bad one fails before any run."""
    options = {}
    for text in texts:
        name, dot, rest = text.partition(".")
        if not dot or not rest:
            raise ValueError(f"--option takes METHOD.KEY=VALUE, e.g. specpc.lookahead=1, not {text!r}")
        key, value = parse_option(rest)
        options.setdefault(name, {})[key] = value
    for name, opts in options.items():
        make_method(name, **opts)
    return options


def variant_options(options: dict, variant: str) -> dict:
    """The options a variant runs with ("speckv@head" takes speckv's)."""
    return options.get(variant.partition("@")[0], {})


def _key(row: dict) -> tuple:
    draft = row["models"]["draft"]
    if row["kind"] == "answer" and row["variant"] in report.DRAFT_FREE:
        draft = None  # its answer is the same with any draft: measured once
    models = (draft, row["models"]["target"], row["models"].get("flash_attn", "off"))
    variant = (row["variant"], tuple(sorted(row.get("options", {}).items())))
    if row["kind"] == "answer":
        return ("answer", models, row["context_tokens"], row["task"], row["seed"], variant, row["budget"])
    # a timing run counts only on the machine that made it: a run resumed
    # elsewhere times every run again rather than mix two machines' times
    return ("timing", models, row["context_tokens"], variant, row["budget"], row.get("run", 0),
            machine_label(row["machine"]))


def main(args) -> int:
    prof = resolve(args)
    out = Path(prof.out)
    runs = out / "runs.jsonl"
    if args.readme:
        readme.current(Path(args.readme))  # its markers are there before hours of measuring
    if not args.report:
        measure(prof, runs, args.threads, args.only, args.flash_attn, args.draft_quant, args.draft_layers,
                args.retime)
    rows = report.build(runs, out, args.profile)
    print(report.table(rows))
    if args.readme:
        answers = [r for r in report.load_labelled(runs) if r["kind"] == "answer"]
        readme.update(Path(args.readme), readme.section(rows, answers, planned_prompts(prof)))
    return 0


def planned_prompts(prof: Profile) -> dict:
    """Context length -> the prompts planned there by the profiles that share
    prof's results folder (prof's own tasks and samples for its contexts)."""
    planned = {c: len(p.tasks) * p.samples for p in PROFILES.values() if p.out == prof.out for c in p.contexts}
    return {**planned, **{c: len(prof.tasks) * prof.samples for c in prof.contexts}}


def measure(prof: Profile, runs: Path, threads: int = 0, only: str = None, flash_attn: str = "off",
            draft_quant: str = None, draft_layers: int = 0, retime: bool = False) -> None:
    draft = prof.draft or registry.default_model("draft")
    target = prof.target or registry.default_model("target")
    models = {"draft": draft, "target": target}
    if standin.is_standin(target):
        target = standin.model_path(target)  # the rows name the stand-in
        if only != "timing":
            log.info("%s: timing only, its answers are noise", models["target"])
            only = "timing"
    if draft_quant or draft_layers:
        # made once here; the rows name the derived file
        draft = str(derived_draft(registry.resolve(draft), draft_quant, draft_layers, threads))
        models["draft"] = Path(draft).name
    if flash_attn != "off":
        models["flash_attn"] = flash_attn
    done = {_key(row) for row in report.load_runs(runs)}
    here = machine()
    prompts = [(t, s) for s in range(prof.samples) for t in prof.tasks] if only != "timing" else []
    # budgets beyond the profile's are not timed
    timed = [(v, b) for v in prof.variants for b in prof.timed.get(v, []) if b == 0 or b in prof.budgets]
    runs_each = prof.timing_runs if only != "answers" else 0
    bar = tqdm(total=len(prof.contexts) * (len(prompts) + len(timed) * runs_each), desc="bench", unit="run",
               dynamic_ncols=True)
    for context in prof.contexts:
        if prompts:
            with SpecSession(draft=draft, target=target, n_threads=threads, flash_attn=flash_attn,
                             progress=False) as session:
                for task_name, seed in prompts:
                    base = {"kind": "answer", "models": models, "context_tokens": context, "task": task_name,
                            "seed": seed}
                    todo = [(v, b) for v in prof.variants for b in ([0] if v in BUDGETLESS else prof.budgets)
                            if _key({**base, **_named(v, prof.options), "budget": b}) not in done]
                    if todo:
                        bar.set_postfix_str(f"{task_name} #{seed} @ {context}")
                        answer_prompt(session, base, todo, runs, prof.options)
                    bar.update()
        # end-to-end timing runs, each in a fresh process once the models are
        # released here; run r of every variant before run r + 1 of any
        for run in range(runs_each):
            for variant, budget in timed:
                row = {"kind": "timing", "models": models, "context_tokens": context, **_named(variant, prof.options),
                       "budget": budget, "run": run, "task": prof.tasks[0], "seed": 0,
                       **({"retime": True} if retime else {})}
                if retime or _key({**row, "machine": here}) not in done:
                    bar.set_postfix_str(f"time {variant} {budget} @ {context} (run {run + 1})")
                    row.update(time_one(draft, target, variant, budget or 10**9, context, prof.tasks[0], threads,
                                        flash_attn, row.get("options")))
                    append_result(runs, row)
                bar.update()
    bar.close()


def _named(variant: str, options: dict) -> dict:
    """A row's variant, with its options where they are not the defaults."""
    opts = variant_options(options, variant)
    return {"variant": variant, "options": opts} if opts else {"variant": variant}


def answer_prompt(session, base: dict, todo: list, runs: Path, options: dict = None) -> None:
    task = make_task(base["task"], session.target, base["context_tokens"], base["seed"])
    tokens, protected = session.prompt_positions(task.messages)
    variants = list(dict.fromkeys(v for v, _ in todo))
    forks = PromptForks(session, tokens, protected, task.max_tokens, variants=variants,
                        options={v: variant_options(options or {}, v) for v in variants})
    try:
        for variant, budget in todo:
            text, cells, bytes_per_cell = forks.answer(variant, budget or len(tokens))
            append_result(runs, {**base, **_named(variant, options or {}), "budget": budget,
                                 "prompt_tokens": len(tokens),
                                 "expected": task.expected, "answer": text, "score": task.score(text),
                                 "kv_cells": cells, "target_kv_bytes": cells * bytes_per_cell})
    finally:
        forks.close()


def time_one(draft: str, target: str, variant: str, budget: int, context: int, task: str, threads: int = 0,
             flash_attn: str = "off", options: dict = None) -> dict:
    cmd = [sys.executable, "-m", "pyspec_gguf.bench.single", "--draft", draft, "--target", target,
           "--method", variant, "--budget", str(budget), "--tokens", str(context), "--task", task,
           "--threads", str(threads), "--flash-attn", flash_attn]
    for key, value in (options or {}).items():
        cmd += ["--option", f"{key}={value}"]
    if variant == "specpc":
        cmd.append("--floor")
    # the machine's load as the run starts: what else was running shows here
    load = os.getloadavg()[0]
    # run outside any source tree, so the installed package (with its extension) is imported
    with tempfile.TemporaryDirectory(prefix="pyspec-bench-") as cwd:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ})
    if done.returncode != 0:
        raise RuntimeError(f"timing run failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return {"loadavg": load, "threads": threads, **json.loads(done.stdout.strip().splitlines()[-1])}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pyspec_gguf.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(p)
    return p


if __name__ == "__main__":
    sys.exit(main(parser().parse_args()))
