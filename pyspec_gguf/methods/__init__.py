"""Every method, one class per module. A method scores prompt tokens; the
selection rules (`pyspec_gguf.selection`) and the session's pipelines turn
scores into kept tokens or KV entries."""

from dataclasses import fields

from .auto import Auto
from .base import KVMethod, Method, PromptMethod
from .draft import DraftOnly
from .full import Full
from .headtail import HeadTail
from .selfinfo import SelfInfo
from .snapkv import SnapKV
from .speckv import SpecKV
from .speckv_pc import SpecKVPC
from .specpc import SpecPC
from .specprefill import SpecPrefill
from .streamingllm import StreamingLLM

METHODS = {m.name: m for m in (Full, DraftOnly, SpecPC, SpecKV, SpecKVPC, SnapKV, StreamingLLM, SpecPrefill,
                               SelfInfo, HeadTail, Auto)}


def make_method(name: str, **options) -> Method:
    """Build a method by name with its options, validated. "speckv@head" is
    short for speckv with granularity="head" (the benchmark's row names)."""
    name, at, granularity = name.partition("@")
    if at:
        if "granularity" in options:
            raise ValueError(f"{name}@{granularity}: granularity given twice")
        options["granularity"] = granularity
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    known = [f.name for f in fields(METHODS[name]) if f.init]
    unknown = [key for key in options if key not in known]
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(known) or 'none'}")
    try:
        return METHODS[name](**options)
    except TypeError as e:
        raise ValueError(f"{name}: bad option ({e})") from e


def parse_option(text: str) -> tuple:
    """A method option from the command line's KEY=VALUE: the value as an
    int, a float, a bool (true/false) or else the text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--option takes KEY=VALUE, not {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


__all__ = ["METHODS", "make_method", "parse_option", "Method", "PromptMethod", "KVMethod"] + [m.__name__ for m in METHODS.values()]
