import sys

from .run import main, parser

sys.exit(main(parser().parse_args()))
