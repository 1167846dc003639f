"""Answer a question about a long document, draft-guided.

Streams the answer, then prints a stats line: prompt and kept tokens, time
to first token split by stage, decode speed, the target's KV memory.
"""

import sys
from pathlib import Path

from tqdm.auto import tqdm

from ..engine import Sampling
from ..methods import METHODS, make_method
from ..session import SpecSession, check_budget


def add_cli_args(parser) -> None:
    parser.add_argument("--doc", required=True, help="text file with the document ('-' reads stdin)")
    parser.add_argument("--question", required=True, help="the question to answer")
    parser.add_argument("--method", default="specpc", choices=list(METHODS), help="default: specpc")
    parser.add_argument("--budget", type=_budget, default=1024,
                        help="tokens kept: a count (1024) or a fraction of the prompt (0.25); default 1024")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="method hyperparameter, e.g. --option window=32 (repeatable)")
    parser.add_argument("--compare", action="store_true", help="also run 'full' and show both")
    parser.add_argument("--show-kept", action="store_true", help="print the document with kept spans marked")
    parser.add_argument("--draft", default="", help="draft model spec (default: the registry's draft)")
    parser.add_argument("--target", default=None, help="target model spec (default: the registry's target)")
    parser.add_argument("--max-tokens", type=int, default=128, help="answer length limit (default 128)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    parser.add_argument("--n-gpu-layers", type=int, default=0, help="layers offloaded to a GPU build (-1: all)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--seed", type=int, default=0)


def _budget(text: str):
    """'1024' is a token count, '0.25' a fraction of the prompt."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _option(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--option takes KEY=VALUE, not {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def read_doc(path: str) -> str:
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"the document {path!r} is empty")
    return text


def build_messages(doc: str, question: str) -> list:
    return [{"role": "user", "content": f"{doc}\n\nAnswer the question about the text above.\n"
                                        f"Question: {question}"}]


def show_kept(session, result) -> None:
    """The prompt with kept tokens plain and dropped runs shown as [...]."""
    kept = set(result.kept.tolist())
    out, dropped = [], 0
    for i, tok in enumerate(result.prompt_tokens):
        if i in kept:
            if dropped:
                out.append(f"\x1b[2m[…{dropped}]\x1b[0m" if sys.stdout.isatty() else f"[…{dropped}]")
                dropped = 0
            out.append(session.target.token_bytes(int(tok)).decode("utf-8", errors="replace"))
        else:
            dropped += 1
    print("".join(out))


def main(args) -> int:
    # everything that can be checked without the models is checked first
    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    if not args.question.strip():
        raise ValueError("--question is empty")
    check_budget(args.budget)
    options = dict(_option(o) for o in args.option)
    make_method(args.method, **options)
    doc = read_doc(args.doc)
    messages = build_messages(doc, args.question)
    uses_draft = args.compare or METHODS[args.method].uses_draft
    with SpecSession(draft=args.draft if uses_draft else None, target=args.target, n_threads=args.threads,
                     n_gpu_layers=args.n_gpu_layers) as session:
        question_tokens = len(session.target.tokenize(args.question, add_special=False))
        runs = [("full", {})] if args.compare and args.method != "full" else []
        runs.append((args.method, options))
        for name, opts in runs:
            result = _answer(session, messages, name, opts, args, question_tokens + 16, labelled=len(runs) > 1)
            print(result.stats.line(), file=sys.stderr)
            if args.show_kept and name == args.method:
                show_kept(session, result)
    return 0


def _answer(session, messages, name: str, options: dict, args, protect_last: int, labelled: bool):
    """Stream one method's answer, with a prefill progress bar until its
    first piece. The bar is closed (its line cleared) before anything else
    is printed, an error's message included."""
    bar = tqdm(unit="tok", desc=f"{name} prefill", leave=False, file=sys.stderr)

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    try:
        stream = session.generate(messages, method=name, budget=args.budget, max_tokens=args.max_tokens,
                                  stream=True, sampling=Sampling(args.temperature, 1.0, args.seed),
                                  protect_last=protect_last, progress=progress, **options)
        first = True
        for piece in stream:
            if first:
                bar.close()
                if labelled:
                    print(f"--- {name}:")
                first = False
            print(piece, end="", flush=True)
    finally:
        bar.close()
    print()
    return stream.result
