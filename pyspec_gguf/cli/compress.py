"""Print a long document compressed for a question, for any engine.

The draft reads the document and the question; the text of the tokens the
method keeps is printed (dropped runs marked with --marker), ready to paste
into, or pipe to, Ollama, llama-server, LM Studio or any other engine. The
figures go to stderr.
"""

import json
import sys

from ..document import question_protect
from .ask import add_question_args, build_messages, read_doc
from .common import add_engine_args, checked_options, open_session, progress_bar


def add_cli_args(parser) -> None:
    add_question_args(parser, "the question the compressed text must answer")
    parser.add_argument("--marker", default=" …", help="what stands for each dropped run (default ' …'; '' drops silently)")
    parser.add_argument("--json", action="store_true", help="print the compressed chat messages and figures as JSON")
    parser.add_argument("--draft", default="", help="draft model spec (default: the registry's draft)")
    parser.add_argument("--target", default=None, help="target model spec, for its tokenizer and chat template "
                        "(default: the registry's target)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    parser.add_argument("--n-gpu-layers", type=int, default=0, help="layers offloaded to a GPU build (-1: all)")
    add_engine_args(parser)


def main(args) -> int:
    if not args.question.strip():
        raise ValueError("--question is empty")
    args.max_tokens = 1
    options = checked_options(args)
    messages = build_messages(read_doc(args.doc), args.question)
    with open_session(args) as session:
        with progress_bar(f"{args.method} reading") as progress:
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
