"""Entry point of the ``pyspec-gguf`` command."""

import argparse
import logging
import sys

from . import ask, bench, chat, compress, models, serve

COMMANDS = {"ask": ask, "chat": chat, "compress": compress, "serve": serve, "models": models, "bench": bench}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyspec-gguf", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__)
        module.add_cli_args(p)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG)
        from .. import set_verbose
        set_verbose(True)
    else:  # pypdf warns of every flaw it reads past ("EOF marker not found"): -v shows them
        logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        return COMMANDS[args.command].main(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        print(f"pyspec-gguf: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
