"""Chat with a long document in the terminal: the draft reads it once, each question then costs the question.

Type a question and press Enter; the answer streams, then a stats line
(tokens kept, time to first token by stage, the target's KV). Earlier
questions and answers stay in the conversation. Commands: /kept (the text
the last answer was built from), /method NAME, /budget N, /option KEY=VALUE,
/save (keep the document's draft state on disk for next time), /reset
(forget the conversation), /help. Ctrl-C stops an answer and keeps the
session; Ctrl-D exits.
"""

import sys
from pathlib import Path

from ..document import Document
from ..methods import METHODS, make_method, parse_option
from ..session import check_budget
from ..sources import read_source
from .common import (add_method_args, add_model_args, checked_options, kept_text, open_session, parse_budget,
                     print_answer, progress_bar, sampling)

HELP = """/kept                 the text the last answer was built from ([…n]: n tokens dropped)
/method NAME          answer with another method ({methods})
/budget N             tokens kept: a count (1024) or a fraction of the prompt (0.25)
/option KEY=VALUE     a method hyperparameter (/method resets them)
/save                 keep the document's draft state on disk: the next chat on it starts at once
/reset                forget the conversation (the document stays read)
/help                 this list
Ctrl-C stops an answer; Ctrl-D exits."""


def add_cli_args(parser) -> None:
    parser.add_argument("--doc", required=True, help="the document: .txt, .md, .pdf or .html")
    add_method_args(parser)
    add_model_args(parser, max_tokens=256)
    parser.add_argument("--no-saved", action="store_true", help="read the document even if a saved state exists")
    parser.add_argument("--reuse-kept", action="store_true",
                        help="prompt-side methods: the target keeps the KV of the document tokens kept so far, "
                             "so a later question prefills only what it newly keeps (faster later turns; the "
                             "target holds up to 3x the kept tokens)")


class Chat:
    """The conversation's settings and its commands."""

    def __init__(self, doc, args, options: dict):
        self.doc, self.args = doc, args
        self.method, self.budget, self.options = args.method, args.budget, options

    def ask(self, question: str) -> None:
        try:
            with progress_bar(self.method) as progress:
                stream = self.doc.ask(question, method=self.method, budget=self.budget,
                                      max_tokens=self.args.max_tokens, stream=True, sampling=sampling(self.args),
                                      progress=progress, speculative=self.args.speculative, **self.options)
                print_answer(stream, progress)
        except KeyboardInterrupt:
            print("\n[answer stopped; the conversation goes on without it]", file=sys.stderr)
            return
        print(stream.result.stats.line(), file=sys.stderr)

    def command(self, line: str) -> None:
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name == "/kept":
            if self.doc.last is None:
                print("no answer yet")
            else:
                print(kept_text(self.doc.session.target, self.doc.last))
        elif name == "/method":
            make_method(rest)
            self.method, self.options = rest, {}
            print(f"method: {rest}")
        elif name == "/budget":
            budget = parse_budget(rest)
            check_budget(budget)
            self.budget = budget
            print(f"budget: {budget}")
        elif name == "/option":
            key, value = parse_option(rest)
            make_method(self.method, **{**self.options, key: value})
            self.options[key] = value
            print(f"{self.method} options: {self.options}")
        elif name == "/save":
            print(f"saved: {self.doc.save()}")
        elif name == "/reset":
            self.doc.forget()
            print("conversation forgotten")
        elif name == "/help":
            print(HELP.format(methods=", ".join(METHODS)))
        else:
            print(f"unknown command {name}; /help lists them")


def main(args) -> int:
    options = checked_options(args)
    text, name = read_source(Path(args.doc))  # read once, and checked before any model loads
    with open_session(args, uses_draft=True) as session:
        with progress_bar("reading the document") as progress:
            doc = Document(session, text, name, progress=progress, cache=not args.no_saved,
                           reuse_kept=args.reuse_kept)
        how = f"loaded from {doc.loaded_from}" if doc.loaded_from else "read"
        print(f"{name}: {len(doc.prefix):,} tokens, {how} in {doc.read_seconds:.1f} s. "
              "Ask a question (/help for commands, Ctrl-D to exit).", file=sys.stderr)
        chat = Chat(doc, args, options)
        try:
            import readline  # noqa: F401  line editing and history for input(), where the platform has it
        except ImportError:
            pass
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                continue
            if not line:
                continue
            try:
                chat.command(line) if line.startswith("/") else chat.ask(line)
            except (ValueError, KeyError, FileNotFoundError) as e:
                print(f"error: {e}", file=sys.stderr)
