"""What the `ask` and `chat` commands share: the model and method
arguments, their early checks, the progress bar and the kept-text view."""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import speculate
from ..engine import Sampling
from ..methods import METHODS, make_method, parse_option
from ..registry import check_model_spec
from ..session import SpecSession, check_budget, check_session_options


def add_method_args(parser, default: str = "auto") -> None:
    parser.add_argument("--method", default=default, choices=list(METHODS),
                        help="default: %(default)s" + (" (full or specpc, whichever this machine answers sooner "
                                                       "for the prompt, from the models' measured speed)"
                                                       if default == "auto" else ""))
    parser.add_argument("--budget", type=budget_arg, default=1024,
                        help="tokens kept: a count (1024) or a fraction of the prompt (0.25); default %(default)s")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="method hyperparameter, e.g. --option window=32 (repeatable)")


def add_model_args(parser, max_tokens: int) -> None:
    add_load_args(parser)
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help="answer length limit (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--seed", type=int, default=0)
    add_speculative_arg(parser)


def add_speculative_arg(parser) -> None:
    parser.add_argument("--speculative", choices=speculate.MODES, default=speculate.DEFAULT,
                        help="draft the answer for the target to verify, a few tokens per batch: 'lookup' from the "
                             "document, 'draft' with the draft model, 'auto' both (default: %(default)s)")


def add_load_args(parser, target_help: str = "target model spec (default: the registry's target)") -> None:
    """Which models to load, and how."""
    parser.add_argument("--draft", default="", help="draft model spec (default: the registry's draft)")
    parser.add_argument("--target", default=None, help=target_help)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: all)")
    parser.add_argument("--n-gpu-layers", type=int, default=-1,
                        help="layers offloaded on a GPU build (default -1: all; 0: none)")
    add_engine_args(parser)


def add_engine_args(parser) -> None:
    parser.add_argument("--flash-attn", choices=["off", "on", "auto"], default="auto",
                        help="flash attention in every context (default: %(default)s, llama.cpp's: on wherever "
                             "the backend supports it; 'off' can be faster on some CPUs, see the README)")
    parser.add_argument("--draft-quant", default=None, metavar="TYPE",
                        help="requantize the draft once (cached), e.g. q4_0: a faster prefill on CPUs")
    parser.add_argument("--draft-layers", type=int, default=0, metavar="K",
                        help="cut the draft to its first K layers (cached); 0: all")


def session_options(args) -> dict:
    """SpecSession's engine options from the command line."""
    return {"n_threads": args.threads, "n_gpu_layers": args.n_gpu_layers, "flash_attn": args.flash_attn,
            "draft_quant": args.draft_quant, "draft_layers": args.draft_layers}


def parse_budget(text: str):
    """'1024' is a token count, '0.25' a fraction of the prompt."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"a budget is a token count (1024) or a fraction of the prompt (0.25), "
                         f"not {text!r}") from None


def budget_arg(text: str):
    """parse_budget for argparse, which prints this message as it is."""
    try:
        return parse_budget(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def checked_options(args) -> dict:
    """The method's options, with everything that can be checked without the
    models checked first (max tokens, budget, threads, the models' files,
    method and options)."""
    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    check_budget(args.budget)
    options = dict(parse_option(o) for o in args.option)
    make_method(args.method, **options)
    check_session_options(**session_options(args))
    for spec in (args.target, args.draft):
        if spec:
            check_model_spec(spec)
    return options


def open_session(args, uses_draft: bool = True) -> SpecSession:
    return SpecSession(draft=args.draft if uses_draft else None, target=args.target, **session_options(args))


def sampling(args) -> Sampling:
    return Sampling(args.temperature, 1.0, args.seed)


# what the bar says each stage of an answer is doing (`passes.STAGES`)
STAGE_LABELS = {"draft_prefill": "the draft reads the prompt", "lookahead": "the draft looks ahead",
                "scoring": "choosing what to keep", "target_prefill": "the target prefills",
                "eviction": "dropping KV entries", "calibrate_draft": "timing the draft on this machine (once)",
                "calibrate_target": "timing the target on this machine (once)"}


class ProgressBar:
    """A tqdm bar fed by progress(done, total) callbacks, and renamed and
    restarted by stage(name) as each stage of an answer begins, so that no
    long stage runs behind a finished bar."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar = tqdm(unit="tok", desc=desc, leave=False, file=sys.stderr)

    def __call__(self, done: int, total: int) -> None:
        self.bar.total, self.bar.n = total, done  # the clock keeps running from the stage's start
        self.bar.refresh()  # at once: a chunk can take seconds, more than tqdm's own pacing expects

    def stage(self, name: str) -> None:
        self.bar.reset(total=None)
        self.bar.total = None  # reset keeps the last total
        self.bar.set_description_str(f"{self.desc}: {STAGE_LABELS.get(name, name)}")

    def close(self) -> None:
        self.bar.close()


@contextmanager
def progress_bar(desc: str):
    """A ProgressBar, closed (its line cleared) on the way out, so that
    whatever is printed next, an error's message included, stands on its own
    line; the package's log is written above it meanwhile."""
    bar = ProgressBar(desc)
    try:
        with log_above(bar):
            yield bar
    finally:
        bar.close()


@contextmanager
def log_above(bar: ProgressBar):
    """The package's log messages (a refused saved state, say) on lines of
    their own above the bar, not run into it. With -v the log keeps the
    handler it was given."""
    log = logging.getLogger("pyspec_gguf")
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    with logging_redirect_tqdm(loggers=[log], tqdm_class=type(bar.bar)):
        yield


def print_answer(stream, progress, label=None) -> None:
    """Print an answer's pieces as they come; the progress bar goes away
    before the first."""
    first, pieces = True, iter(stream)
    try:
        for piece in pieces:
            if first:
                progress.close()
                if label:
                    print(label)
                first = False
            print(piece, end="", flush=True)
    finally:
        pieces.close()  # an interrupted answer gives its contexts back now
    print()


def kept_text(model, result, mark_dropped=None) -> str:
    """The prompt with kept tokens plain and each dropped run replaced by
    mark_dropped(n) (default: '[…n]', dimmed on a terminal)."""
    if mark_dropped is None:
        dim = sys.stdout.isatty()
        mark_dropped = (lambda n: f"\x1b[2m[…{n}]\x1b[0m") if dim else (lambda n: f"[…{n}]")
    kept = set(result.kept.tolist())
    out, dropped = [], 0
    for i, tok in enumerate(result.prompt_tokens):
        if i in kept:
            if dropped:
                out.append(mark_dropped(dropped))
                dropped = 0
            out.append(model.token_bytes(int(tok)).decode("utf-8", errors="replace"))
        else:
            dropped += 1
    if dropped:
        out.append(mark_dropped(dropped))
    return "".join(out)
