"""Print a long document compressed for a question, for any engine.

The draft reads the document and the question; the text of the tokens the
method keeps is printed (dropped runs marked with --marker), ready to paste
into, or pipe to, Ollama, llama-server, LM Studio or any other engine. The
figures go to stderr.
"""

import json
import sys

from ..compress import check_compressible
from ..document import question_protect
from ..methods import make_method
from .ask import add_question_args, build_messages, read_doc
from .common import add_load_args, checked_options, open_session, progress_bar


def add_cli_args(parser) -> None:
    add_question_args(parser, "the question the compressed text must answer", method="specpc")
    parser.add_argument("--marker", default=" …", help="what stands for each dropped run (default ' …'; '' drops silently)")
    parser.add_argument("--json", action="store_true", help="print the compressed chat messages and figures as JSON")
    add_load_args(parser, "target model spec, for its tokenizer and chat template (default: the registry's target)")


def main(args) -> int:
    if not args.question.strip():
        raise ValueError("--question is empty")
    args.max_tokens = 1
    options = checked_options(args)
    check_compressible(make_method(args.method, **options))
    messages = build_messages(read_doc(args.doc), args.question)
    with open_session(args) as session:
        with progress_bar(args.method) as progress:
            compressed = session.compress(messages, args.budget, args.method,
                                          question_protect(session.target, args.question), args.marker, progress,
                                          **options)
    if args.json:
        print(json.dumps(compressed.to_dict(), ensure_ascii=False, indent=1))
    else:
        print(compressed.messages[-1]["content"])
    print(f"[{compressed.method}] prompt {compressed.prompt_tokens} tok, kept {compressed.kept_tokens}, "
          f"compressed text {compressed.compressed_tokens} tok", file=sys.stderr)
    return 0
