"""One method on one prompt, end to end through SpecSession.generate, in a
process of its own so that its time to first token and peak RSS are its
alone: the timing side of the benchmark. Prints one JSON object.

With --floor (SpecPC), also measures what SpecPC cannot go below: the
draft's plain prefill of the prompt and the target's prefill of the kept
tokens, each alone, after the method's own run.

    python -m pyspec_gguf.bench.single --method specpc --budget 1024 --tokens 8192 --task niah_single --floor
"""

from __future__ import annotations

import argparse
import json

from ..methods import parse_option
from ..passes import Clock, DraftNeeds, draft_pass, prefill_answer_context
from ..session import SpecSession
from .tasks import TASKS, make_task


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", default="", help="draft model (default: the registry's)")
    p.add_argument("--target", default=None, help="target model (default: the registry's)")
    p.add_argument("--method", required=True, help="a method name, or name@head / name@token")
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True, help="context length of the task prompt")
    p.add_argument("--task", default="niah_single", choices=list(TASKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("--flash-attn", choices=["off", "on", "auto"], default="off")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option other than its default (repeatable)")
    p.add_argument("--floor", action="store_true")


def run(args) -> dict:
    with SpecSession(draft=args.draft, target=args.target, n_threads=args.threads, flash_attn=args.flash_attn,
                     progress=False) as s:
        task = make_task(args.task, s.target, args.tokens, args.seed)
        options = dict(parse_option(o) for o in args.option)
        r = s.generate(task.messages, method=args.method, budget=args.budget, max_tokens=task.max_tokens, **options)
        st = r.stats
        row = {"answer": r.text, "score": task.score(r.text), "prompt_tokens": st.prompt_tokens,
               "kept_tokens": st.kept_tokens, "ttft_s": st.ttft_s, "times": st.times,
               "decode_tok_s": st.decode_tok_s, "generated_tokens": st.generated_tokens,
               "target_kv_bytes": st.target_kv_bytes, "peak_rss_bytes": st.peak_rss_bytes}
        if st.auto:  # what auto chose, its predictions, and its calibration's seconds (not in the TTFT)
            row["auto"] = {**st.auto, "method": st.method}
        if args.floor:
            row["floor"] = floor(s, r)
    return row


def floor(s: SpecSession, r) -> dict:
    """The draft's plain prefill of the prompt, then the target's prefill
    of the kept tokens, each alone."""
    tokens = r.prompt_tokens
    clock = Clock()
    draft_pass(s.draft, tokens, DraftNeeds(), s.context_options, clock)
    prefill_answer_context(s.target, tokens[r.kept], s.context_options, clock, room=0).close()
    times = {"draft_prefill_s": clock.times["draft_prefill"], "target_prefill_s": clock.times["target_prefill"]}
    times["floor_s"] = times["draft_prefill_s"] + times["target_prefill_s"]
    return times


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    print(json.dumps(run(parser.parse_args())))
