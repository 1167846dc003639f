"""The ``pyspec-gguf`` command: one module per subcommand, each with
``add_cli_args(parser)`` and ``main(args)``."""
