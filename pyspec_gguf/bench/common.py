"""What every benchmark records: the machine, the command, and where results go."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

from .. import _native


def _cpuinfo() -> dict:
    """The first processor's fields in /proc/cpuinfo (empty off Linux)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor ends at its blank line
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def machine() -> dict:
    info = _cpuinfo()
    m = {
        "platform": platform.platform(),
        "cpu": info.get("model name", platform.processor()),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "llama_system_info": _native.llama_system_info().strip(),
        "gpu_offload": _native.supports_gpu_offload(),
    }
    # one model name ("AMD EPYC") covers CPU generations whose times differ
    if "cpu family" in info:
        m["cpu_family"], m["cpu_model"] = info["cpu family"], info.get("model", "?")
    return m


def machine_label(m: dict) -> str:
    """A machine as its times depend on it: the CPU and its generation
    (family and model, where recorded), its cores and the widest SIMD
    llama.cpp uses there (one "AMD EPYC" may be AVX2-only or AVX-512).
    Times from two machines are never mixed in one median."""
    info = m.get("llama_system_info", "")
    simd = next((f for f in ("AVX512", "AVX2", "AVX", "NEON") if f"{f} = 1" in info), "no SIMD")
    cpu = m.get("cpu", "?")
    if "cpu_family" in m:
        cpu += f" (family {m['cpu_family']}, model {m.get('cpu_model', '?')})"
    return f"{cpu}, {m.get('cores', '?')} cores, {simd}" + (", GPU" if m.get("gpu_offload") else "")


def command() -> str:
    """The command line of this process, as it was typed."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    flags = ["-P"] if getattr(sys.flags, "safe_path", False) else []
    if spec is not None:
        words = ["python", *flags, "-m", spec.name.removesuffix(".__main__")]
    elif sys.argv[0].endswith(".py"):  # a script such as studies/lookahead.py
        words = ["python", *flags, sys.argv[0]]
    else:  # a console script such as pyspec-gguf
        words = [os.path.basename(sys.argv[0])]
    return " ".join(shlex.quote(a) for a in words + sys.argv[1:])


def append_result(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command(), "machine": machine(), **row}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_rows(path: Path) -> list[dict]:
    """The JSON lines of a results file; a line cut short by a stop is
    skipped (its measurement is taken again)."""
    rows = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def paired_interval(diffs: list[float]) -> tuple:
    """Mean of paired differences and its 95% interval (paired standard
    error over prompts); None for fewer than two pairs."""
    if len(diffs) < 2:
        return None
    d = sum(diffs) / len(diffs)
    se = (sum((x - d) ** 2 for x in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
    return d, d - 1.96 * se, d + 1.96 * se


def add_prompt_set_args(p: argparse.ArgumentParser, tokens: int) -> None:
    """The options of a study over the benchmark's prompts: their length,
    which seeds of which tasks, the budget and the threads."""
    from .tasks import TASKS
    p.add_argument("--tokens", type=int, default=tokens)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--seeds", help="comma-separated seeds instead of 0..samples-1")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0)


def seeds_of(args) -> list:
    """The seeds `add_prompt_set_args`' options name."""
    return [int(x) for x in args.seeds.split(",")] if args.seeds else list(range(args.samples))


def script(doc: str, add_cli_args, main, summary) -> None:
    """A benchmark module run as a script: its options, then a run that
    appends to --out, or with --summary only the summary of what --out holds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    parser.add_argument("--summary", action="store_true", help="only print the summary of --out")
    args = parser.parse_args()
    if args.summary:
        print(summary(args))
    else:
        main(args)
