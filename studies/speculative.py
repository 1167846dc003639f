"""Speculative decoding of long answers about one document: decode speed,
acceptance and exactness per drafter, and what the same acceptance would
give a 7B target.

    python -P studies/speculative.py --tokens 8192 --runs 3
    python -P studies/speculative.py --cost --target standin:qwen2.5-7b
    python -P studies/speculative.py --gaps

The first asks questions whose answers run long about the benchmark's
8K-token haystack of essays: per question the prompt's passes and SpecPC's
selection run once, then every mode (off, lookup, draft, auto: in turn, run
after run, so the machine's drift hits them alike) decodes from that same
state, greedily; a row per answer, appended as it comes, the same command
later skipping the rows the file holds.

The second measures, on the given target and the registry's draft, what a
decode step costs: the target verifying m tokens in one batch (m = 1..9)
on 1,024 kept tokens, and the draft proposing one token after the whole
prompt. Every run then prints, for each target measured, the decode
speedup projected from those costs and the counts the first measured on the
pair (verify batches, drafted and accepted tokens, draft decodes) — a
projection, labelled as one.

The third decodes each question's plain answer again, one step at a time,
and records every step's margin (the top logit minus the runner-up's): at
each place where a speculated answer in the file parted from plain
decoding's, how near a tie the plain step was, against all steps' margins.

Reproduces bench/README.md, "Answers faster: speculative decoding".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from pyspec_gguf import make_method, registry, speculate
from pyspec_gguf.bench import standin
from pyspec_gguf.bench.common import append_result
from pyspec_gguf.bench.tasks import make_conversation
from pyspec_gguf.document import conversation, question_protect
from pyspec_gguf.engine import Model, Sampling
from pyspec_gguf.pipeline import Analysis
from pyspec_gguf.session import SpecSession

QUESTIONS = [
    "Quote the first three paragraphs of the text word for word.",
    "Summarize the text in detail, in at least ten sentences.",
    "List every special magic number in the text with the name it is for, then say in a few sentences what "
    "the text around each one discusses.",
    "Explain at length what the author says about startups, investors and hiring, quoting the text.",
]
MODES = ["off", "lookup", "draft", "auto"]


def _rows(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def answers(args) -> None:
    """Per question: the prompt's passes and SpecPC's selection once, then
    every mode decodes from that same state, run after run."""
    out = Path(args.out)
    key = {"kind": "answer", "tokens": args.tokens, "budget": args.budget, "max_tokens": args.max_tokens,
           "method": args.method}
    done = {(r["run"], r["question"], r["mode"]) for r in _rows(out)
            if all(r.get(k) == v for k, v in key.items())}
    modes = args.modes.split(",")
    with SpecSession(draft=args.draft, target=args.target, n_threads=args.threads, progress=False) as session:
        text, _ = make_conversation(session.target, args.tokens, 4, args.seed)
        method = make_method(args.method)
        for q, question in enumerate(QUESTIONS):
            todo = [(run, mode) for run in range(args.runs) for mode in modes if (run, q, mode) not in done]
            if todo:
                decode_from_one_state(session, method, text, q, todo, key, args, out)


def decode_from_one_state(session, method, text: str, q: int, todo: list, key: dict, args, out: Path) -> None:
    question = QUESTIONS[q]
    tokens, protected = session.prompt_positions(conversation(text, [], question),
                                                  question_protect(session.target, question))
    analysis = Analysis(session, tokens, protected, args.max_tokens, [method],
                        draft_room=args.max_tokens + speculate.K_MAX + 1)
    try:
        prepared = analysis.prepare(method, args.budget)
        ctx, seq = prepared.answer.context, prepared.answer.seq
        last = ctx.next_pos(seq) - 1  # the last prompt token: decoded again before each answer
        last_token = np.array([tokens[-1]], np.int32)
        draft_ctx = analysis.draft_context()
        cost = speculate.step_cost(session.draft, session.target)
        plain = {}
        for run, mode in todo:
            ctx.seq_rm(seq, last, -1)
            ctx.decode(last_token, last, seq, "last")
            counts = speculate.SpecCounts()
            drafter = speculate.make_drafter(mode, tokens, draft_ctx if mode != "lookup" else None, counts, cost)
            t0 = time.perf_counter()
            if drafter is None:
                answer = list(ctx.generate(args.max_tokens, Sampling(), seq=seq))
            else:
                answer = list(speculate.generate(ctx, seq, drafter, args.max_tokens, Sampling(),
                                                 session.target.is_eog, counts))
            seconds = time.perf_counter() - t0
            if mode == "off":
                plain[run] = answer
            row = {**key, "run": run, "question": q, "mode": mode, "prompt_tokens": len(tokens),
                   "kept_tokens": prepared.cells, "decode_s": seconds, "generated_tokens": len(answer),
                   "decode_tok_s": len(answer) / seconds, "drafted": counts.drafted, "accepted": counts.accepted,
                   "verify_steps": counts.steps, "draft_decodes": counts.draft_decodes,
                   "answer_sha": hashlib.sha256(np.asarray(answer, np.int32).tobytes()).hexdigest()[:16],
                   "first_difference": _first_difference(answer, plain.get(run)),
                   "answer": session.target.detokenize(answer)}
            append_result(out, row)
            print(f"q{q} run {run} {mode:>6}: {len(answer)} tok, {row['decode_tok_s']:.2f} tok/s, "
                  f"{counts.accepted}/{counts.drafted} accepted", file=sys.stderr, flush=True)
    finally:
        analysis.close()


def gaps(args) -> None:
    """The plain step's logit margin where each speculated answer parted."""
    out = Path(args.out)
    key = {"kind": "answer", "tokens": args.tokens, "budget": args.budget, "max_tokens": args.max_tokens,
           "method": args.method}
    answered = [r for r in _rows(out) if all(r.get(k) == v for k, v in key.items())]
    parted = [r for r in answered if isinstance(r["first_difference"], int)]
    measured = {r["question"] for r in _rows(out) if r.get("kind") == "margins"
                and all(r.get(k) == v for k, v in {**key, "kind": "margins"}.items())}
    with SpecSession(draft=args.draft, target=args.target, n_threads=args.threads, progress=False) as session:
        text, _ = make_conversation(session.target, args.tokens, 4, args.seed)
        method = make_method(args.method)
        for q in sorted({r["question"] for r in parted} - measured):
            question = QUESTIONS[q]
            tokens, protected = session.prompt_positions(conversation(text, [], question),
                                                          question_protect(session.target, question))
            analysis = Analysis(session, tokens, protected, args.max_tokens, [method])
            try:
                prepared = analysis.prepare(method, args.budget)
                answer, margins = plain_margins(prepared.answer.context, prepared.answer.seq, int(tokens[-1]),
                                                args.max_tokens, session.target.is_eog)
            finally:
                analysis.close()
            plain_sha = hashlib.sha256(np.asarray(answer, np.int32).tobytes()).hexdigest()[:16]
            plain = {r["answer_sha"] for r in answered if r["question"] == q and r["mode"] == "off"}
            if plain != {plain_sha}:  # e.g. another thread count: the partings are of another answer
                print(f"q{q}: the plain answer {plain_sha} is not the file's {sorted(plain)}; nothing recorded "
                      "(run with the answers' --threads)", file=sys.stderr, flush=True)
                continue
            row = {**key, "kind": "margins", "question": q, "answer_sha": plain_sha, "margins": margins,
                   "partings": [{"run": r["run"], "mode": r["mode"], "at": r["first_difference"],
                                 "margin": margins[r["first_difference"]]
                                 if r["first_difference"] < len(margins) else None}
                                for r in parted if r["question"] == q]}
            append_result(out, row)
            print(f"q{q}: plain answer {plain_sha}, partings at margins "
                  f"{[p['margin'] for p in row['partings']]}", file=sys.stderr, flush=True)


def plain_margins(ctx, seq: int, last_token: int, max_tokens: int, is_eog) -> tuple:
    """Greedy decoding one token per step from the prepared state (its last
    prompt token decoded again, as every mode's answer starts), with each
    step's top logit minus the runner-up's."""
    pos = ctx.next_pos(seq) - 1
    ctx.seq_rm(seq, pos, -1)
    ctx.decode(np.array([last_token], np.int32), pos, seq, "last")
    answer, margins = [], []
    for _ in range(max_tokens):
        logits = ctx.logits()
        top2 = np.partition(logits, -2)[-2:]
        token = int(np.argmax(logits))
        margins.append(float(top2[1] - top2[0]))
        if is_eog(token):
            break
        answer.append(token)
        pos += 1
        ctx.decode(np.array([token], np.int32), pos, seq, "last")
    return answer, margins


def margins_summary(rows: list) -> str:
    """Per parting: the plain step's margin, and the share of all plain
    steps with a margin at most that small."""
    lines = ["| question | mode | run | parted at token | plain margin there | steps with a smaller or equal margin |",
             "|---|---|---|---|---|---|"]
    for r in (r for r in rows if r.get("kind") == "margins"):
        m = np.asarray(r["margins"])
        for p in r["partings"]:
            share = f"{np.mean(m <= p['margin']):.1%}" if p["margin"] is not None else "—"
            margin = f"{p['margin']:.3f}" if p["margin"] is not None else "—"
            lines.append(f"| {r['question']} | {p['mode']} | {p['run']} | {p['at']} | {margin} | {share} |")
    return "\n".join(lines)


def _first_difference(answer: list, plain) -> object:
    """Where an answer first parts from plain decoding's (None: never;
    "n/a": no plain answer to compare in this sitting)."""
    if plain is None:
        return "n/a"
    if answer == plain:
        return None
    return next((i for i, (a, b) in enumerate(zip(answer, plain)) if a != b), min(len(answer), len(plain)))


def summary(rows: list) -> str:
    """Per mode: decode speed, its ratio to plain decoding of the same
    answer (median over questions and runs), acceptance, tokens accepted
    per verify batch, and answers identical to plain decoding's."""
    rows = [r for r in rows if r.get("kind") == "answer"]
    plain = {(r["run"], r["question"]): r for r in rows if r["mode"] == "off"}
    lines = ["| mode | answers | decode tok/s (median) | × plain (median, range) | accepted / drafted | "
             "accepted per batch | identical to plain |", "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        if not mine:
            continue
        pairs = [(r, plain[(r["run"], r["question"])]) for r in mine if (r["run"], r["question"]) in plain]
        ratios = [r["decode_tok_s"] / p["decode_tok_s"] for r, p in pairs]
        drafted, accepted = sum(r["drafted"] for r in mine), sum(r["accepted"] for r in mine)
        steps = sum(r["verify_steps"] for r in mine)
        same = sum(r["answer_sha"] == p["answer_sha"] for r, p in pairs)
        lines.append(f"| {mode} | {len(mine)} | {statistics.median(r['decode_tok_s'] for r in mine):.2f} | "
                     f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) | "
                     f"{accepted}/{drafted} ({accepted / drafted if drafted else float('nan'):.2f}) | "
                     f"{accepted / steps if steps else float('nan'):.2f} | {same}/{len(pairs)} |")
    return "\n".join(lines)


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cost(args) -> None:
    """What a target verify batch of m tokens and a draft step cost."""
    target = standin.model_path(args.target or registry.default_model("target"))
    rng = np.random.default_rng(0)
    row = {"kind": "cost", "target": args.target or registry.default_model("target"), "kept": 1024,
           "tokens": args.tokens, "verify_s": {}}
    opts = {"n_threads": args.threads, "flash_attn": "auto"}
    with Model(target, progress=False) as model:
        ctx = model.context(n_ctx=1024 + 16, **opts)
        ctx.prefill(rng.integers(100, 10_000, 1024).astype(np.int32), want="none")
        for m in range(1, 10):
            batch = rng.integers(100, 10_000, m).astype(np.int32)

            def verify():
                ctx.decode(batch, 1024, 0, "all")
                ctx.seq_rm(0, 1024, -1)
            verify()  # warm
            row["verify_s"][m] = _median_time(verify, args.reps)
        ctx.close()
    with Model(registry.resolve(args.draft or registry.default_model("draft")), progress=False) as model:
        ctx = model.context(n_ctx=args.tokens + 16, **opts)
        ctx.prefill(rng.integers(100, 10_000, args.tokens).astype(np.int32), want="none")
        one = np.array([500], np.int32)

        def step():
            ctx.decode(one, args.tokens, 0, "last")
            ctx.sample()
            ctx.seq_rm(0, args.tokens, -1)
        step()
        row["draft_step_s"] = _median_time(step, args.reps * 4)
        ctx.close()
    append_result(Path(args.out), row)
    print(json.dumps(row), file=sys.stderr)


def projected_time(counts: dict, verify_s: dict, draft_step_s: float) -> float:
    """Decode seconds of an answer with these counts at these step costs:
    its verify batches (1 + the proposals' mean each), its plain steps
    (no proposal), and the draft's decode calls."""
    def batch_s(m: float) -> float:
        ms = sorted(verify_s)
        return float(np.interp(m, ms, [verify_s[k] for k in ms]))
    n, steps = counts["generated_tokens"], counts["verify_steps"]
    plain_steps = max(0, n - counts["accepted"] - steps)
    spec = steps * batch_s(1 + counts["drafted"] / steps) if steps else 0.0
    return spec + plain_steps * batch_s(1) + counts["draft_decodes"] * draft_step_s


def project(rows: list) -> str:
    """The pair's counts at each measured target's step costs."""
    lines = ["| target | mode | projected × plain decode speed |", "|---|---|---|"]
    answered = [r for r in rows if r.get("kind") == "answer" and r["mode"] != "off"]
    for c in (r for r in rows if r.get("kind") == "cost"):
        verify_s = {int(k): v for k, v in c["verify_s"].items()}
        for mode in MODES[1:]:
            mine = [r for r in answered if r["mode"] == mode]
            if not mine:
                continue
            plain = sum(r["generated_tokens"] for r in mine) * verify_s[1]
            spec = sum(projected_time(r, verify_s, c["draft_step_s"]) for r in mine)
            lines.append(f"| {c['target']} | {mode} | {plain / spec:.2f} (projection) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -P studies/speculative.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--method", default="specpc")
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--draft", default="")
    p.add_argument("--target", default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cost", action="store_true", help="measure the step costs of --target and the draft")
    p.add_argument("--gaps", action="store_true", help="the plain step's logit margin where answers parted")
    p.add_argument("--out", default="bench/results/speculative.jsonl")
    args = p.parse_args(argv)
    if args.cost:
        cost(args)
    elif args.gaps:
        gaps(args)
    else:
        answers(args)
    rows = _rows(Path(args.out))
    print(summary(rows))
    print(project(rows))
    print(margins_summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
