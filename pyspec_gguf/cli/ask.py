"""Answer a question about a long document, draft-guided.

Streams the answer, then prints a stats line: prompt and kept tokens, time
to first token split by stage, decode speed, the target's KV memory.
"""

import sys
from pathlib import Path

from ..document import first_turn, question_protect
from ..methods import METHODS
from ..sources import decode_text, read_source
from .common import (add_method_args, add_model_args, checked_options, kept_text, open_session, print_answer,
                     progress_bar, sampling)


def add_question_args(parser, question_help: str = "the question to answer", method: str = "auto") -> None:
    parser.add_argument("--doc", required=True, help="the document: .txt, .md, .pdf or .html ('-' reads text from stdin)")
    parser.add_argument("--question", required=True, help=question_help)
    add_method_args(parser, method)


def add_cli_args(parser) -> None:
    add_question_args(parser)
    parser.add_argument("--compare", action="store_true", help="also run 'full' and show both")
    parser.add_argument("--show-kept", action="store_true", help="print the document with kept spans marked")
    add_model_args(parser, max_tokens=128)


def read_doc(path: str) -> str:
    """The document's text: stdin for '-', else a .txt, .md, .pdf or .html file."""
    if path == "-":
        text = decode_text(sys.stdin.buffer.read(), "the document on stdin")
        if not text.strip():
            raise ValueError("the document on stdin is empty")
        return text
    return read_source(Path(path))[0]


def build_messages(doc: str, question: str) -> list:
    return [{"role": "user", "content": first_turn(doc, question)}]


def main(args) -> int:
    if not args.question.strip():
        raise ValueError("--question is empty")
    options = checked_options(args)
    doc = read_doc(args.doc)
    messages = build_messages(doc, args.question)
    with open_session(args, uses_draft=args.compare or METHODS[args.method].uses_draft) as session:
        runs = [("full", {})] if args.compare and args.method != "full" else []
        runs.append((args.method, options))
        for name, opts in runs:
            with progress_bar(name) as progress:
                stream = session.generate(messages, method=name, budget=args.budget, max_tokens=args.max_tokens,
                                          stream=True, sampling=sampling(args), progress=progress,
                                          speculative=args.speculative,
                                          protect_last=question_protect(session.target, args.question), **opts)
                print_answer(stream, progress, f"--- {name}:" if len(runs) > 1 else None)
            print(stream.result.stats.line(), file=sys.stderr)
            if args.show_kept and name == args.method:
                print(kept_text(session.target, stream.result))
    return 0
