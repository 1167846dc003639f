"""Every method with an easy and a hard setting: a new method is tested the
day it is added to this table."""

from pyspec_gguf.methods import METHODS

# name -> (easy options, hard options); "hard" takes small windows/kernels
# and a long lookahead where the method has them
SETTINGS = {
    "full": ({}, {}),
    "draft": ({}, {}),
    "specpc": ({}, {"window": 8, "kernel": 3, "neighbours": 1, "lookahead": 4, "start_layer": 0,
                    "weighted": False, "reduction": "sum"}),
    "speckv": ({}, {"window": 4, "kernel": 1, "lookahead": 8, "reduction": "sum", "aggregation": "sum",
                    "pool": "avg", "granularity": "head"}),
    "speckv_pc": ({}, {"pc_budget": 200, "kernel": 8, "neighbours": 4, "lookahead": 6, "window": 8,
                       "granularity": "head"}),
    "snapkv": ({}, {"window": 4, "kernel": 3, "pool": "avg", "granularity": "head"}),
    "streamingllm": ({}, {"sinks": 0}),
    "specprefill": ({}, {"lookahead": 2, "chunk": 8, "window": 0}),
    "selfinfo": ({}, {"window": 0}),
    "headtail": ({}, {}),
    "auto": ({}, {"window": 8, "lookahead": 4}),  # resolves to full or specpc (tests/test_speed.py)
}

assert set(SETTINGS) == set(METHODS), "every method needs a row in SETTINGS"
