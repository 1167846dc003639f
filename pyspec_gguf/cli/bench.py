"""Benchmark every method: accuracy, time to first token, KV memory.

Results go to bench/results/ (the quick profile: bench/results/quick/):
runs.jsonl (every measurement, appended as it comes: run again to resume),
latest.jsonl, latest.md and PNG plots.
"""

from ..bench.run import add_cli_args, main  # noqa: F401
