"""Benchmarks. Each is one module runnable with ``python -m``; results are
appended as JSON lines, with the command, machine and models, under
bench/results/."""
