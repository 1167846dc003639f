"""Stand-in targets for timing: a GGUF with a bigger model's published
shapes, the source file's tokenizer, metadata and per-tensor quantization
types, and random weights.

llama.cpp's prefill and decode cost depends on tensor shapes and types, not
on weight values, so a 7B target can be timed on a machine that holds only
a 1.5B. Its answers are noise: a stand-in's rows are timing-only, and the
report keeps them out of every accuracy table.

    path = standin_target(registry.resolve("qwen2.5-coder-1.5b-instruct-q4_k_m"), "qwen2.5-7b")

Where the source file cannot go (a machine with no network, reached through
a copy of a few tens of MiB), a seed can: `write_seed` keeps the source's
metadata and its tensors' names and types, without weights (5.9 MB for
the Qwen 1.5B), and `standin_target` makes from it the same file as from
the source. There, PYSPEC_STANDIN_SOURCE names the seed, and
`--target standin:qwen2.5-7b` is made from it.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..derive import NewTensor, derived_path, made_once, write_gguf

PREFIX = "standin:"
# a seed's own keys: its source's tensor types ({name: type name}, as JSON) and vocabulary size
SEED_TYPES, SEED_VOCAB = "pyspec.seed.tensor_types", "pyspec.seed.vocab"
SOURCE_ENV = "PYSPEC_STANDIN_SOURCE"  # the file stand-ins are made from, where not the default target's


class Shape(NamedTuple):
    """A model's published shapes (its Hugging Face config.json)."""
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    q4_k_m_bytes: int = 0  # the real Q4_K_M file's size, where known


# Every file gets an output matrix: Qwen's own GGUFs carry one even for the
# models that tie it to the embedding (0.5B, 3B), and the last matmul costs
# the same either way. The 0.5B is here to check the method against a real
# file (the default draft).
SHAPES = {
    "qwen2.5-0.5b": Shape(896, 4864, 24, 14, 2),
    "qwen2.5-3b": Shape(2048, 11008, 36, 16, 2),
    "qwen2.5-7b": Shape(3584, 18944, 28, 28, 4, q4_k_m_bytes=4_683_073_504),
    "qwen2.5-14b": Shape(5120, 13824, 48, 40, 8),
}

# bytes per block, and the offsets of the block's f16 scale fields: random
# bytes elsewhere are valid quants, but a random f16 scale can be inf or NaN
BLOCKS = {"Q4_0": (18, (0,)), "Q4_1": (20, (0, 2)), "Q5_0": (22, (0,)), "Q5_1": (24, (0, 2)),
          "Q8_0": (34, (0,)), "Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}
SCALE = np.float16(0.002).tobytes()
# llama.cpp's quantize falls back from a k-quant where a row is not a whole
# number of its 256-weight superblocks (the 0.5B's 896)
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def is_standin(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def check_standin(spec: str) -> str:
    """'standin:qwen2.5-7b' -> 'qwen2.5-7b', or a ValueError naming the sizes."""
    size = spec[len(PREFIX):]
    if size not in SHAPES:
        raise ValueError(f"unknown stand-in {spec!r}; stand-ins: {', '.join(PREFIX + s for s in SHAPES)}")
    return size


def model_path(spec: str) -> str:
    """The file to load for a target `spec`: a stand-in's, made once from
    the file that SOURCE_ENV names (a source or a seed) or else from the
    default target's file; any other spec as it is."""
    if not is_standin(spec):
        return spec
    size = check_standin(spec)
    source = os.environ.get(SOURCE_ENV)
    if not source:
        from .. import registry
        source = registry.resolve(registry.default_model("target"))
    return str(standin_target(Path(source), size))


def standin_target(src: Path, size: str) -> Path:
    """The stand-in for `size` made from the GGUF at `src` (a Qwen2-family
    file), made on first use and cached beside a record of its source."""
    shape = SHAPES[size]
    out = derived_path(Path(src), f"standin-{size}")
    return made_once(Path(src), out, {"standin": size, "shape": list(shape)},
                     lambda tmp: _write_standin(Path(src), tmp, size, shape))


def _write_standin(src: Path, dst: Path, size: str, shape: Shape) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(src)
    changed = {SEED_TYPES: None, SEED_VOCAB: None,
               "qwen2.embedding_length": shape.hidden, "qwen2.feed_forward_length": shape.ffn,
               "qwen2.block_count": shape.layers, "qwen2.attention.head_count": shape.heads,
               "qwen2.attention.head_count_kv": shape.kv_heads,
               "general.name": f"stand-in with {size}'s shapes, random weights (timing only)",
               "general.size_label": None, "general.basename": None, "general.finetune": None}
    write_gguf(reader, dst, changed, standin_tensors(reader, shape))


def standin_tensors(reader, shape: Shape) -> list:
    """The stand-in's tensors (made when written) from a gguf.GGUFReader of
    its source: every tensor of `shape`, each of the source's type for the
    same name, the source's vocabulary."""
    _check_qwen2(reader)
    n_src = reader.fields["qwen2.block_count"].contents()
    types, vocab = source_types(reader)
    return [_random_tensor(name, dims, _source_type(types, name, n_src, shape.layers))
            for name, dims in _tensor_shapes(shape, vocab)]


def write_seed(src: Path, dst: Path) -> None:
    """A seed of the Qwen2 GGUF at `src` at `dst`: its metadata, and its
    tensors' names and types as a key of their own; no tensors."""
    from gguf import GGUFReader

    reader = GGUFReader(src)
    _check_qwen2(reader)
    types, vocab = source_types(reader)
    write_gguf(reader, dst, {SEED_TYPES: json.dumps({n: t.name for n, t in types.items()}), SEED_VOCAB: vocab},
               [])


def source_types(reader) -> tuple:
    """({tensor name: GGMLQuantizationType}, vocabulary size) of a source
    file or of a seed (gguf.GGUFReader)."""
    if SEED_TYPES in reader.fields:
        from gguf import GGMLQuantizationType

        names = json.loads(reader.fields[SEED_TYPES].contents())
        return ({n: GGMLQuantizationType[t] for n, t in names.items()},
                int(reader.fields[SEED_VOCAB].contents()))
    types = {t.name: t.tensor_type for t in reader.tensors}
    return types, int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1])


def _check_qwen2(reader) -> None:
    arch = reader.fields["general.architecture"].contents()
    if arch != "qwen2":
        raise ValueError(f"a stand-in is made from a qwen2 GGUF, not {arch}")


def _tensor_shapes(shape: Shape, vocab: int):
    """(name, GGUF dims: row length first) of every tensor of the model."""
    h, f, kv = shape.hidden, shape.ffn, shape.hidden // shape.heads * shape.kv_heads
    yield "token_embd.weight", (h, vocab)
    for i in range(shape.layers):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (h,)
        yield b + "attn_q.weight", (h, h)
        yield b + "attn_q.bias", (h,)
        yield b + "attn_k.weight", (h, kv)
        yield b + "attn_k.bias", (kv,)
        yield b + "attn_v.weight", (h, kv)
        yield b + "attn_v.bias", (kv,)
        yield b + "attn_output.weight", (h, h)
        yield b + "ffn_norm.weight", (h,)
        yield b + "ffn_gate.weight", (h, f)
        yield b + "ffn_up.weight", (h, f)
        yield b + "ffn_down.weight", (f, h)
    yield "output_norm.weight", (h,)
    yield "output.weight", (h, vocab)


def _source_type(types: dict, name: str, n_src: int, n_new: int):
    """The source's type for the same tensor; layer i of n_new takes the
    type of the source's layer at the same depth (Q4_K_M files give some
    layers' attn_v and ffn_down more bits, chosen by depth, by a rule that
    differs between llama.cpp versions)."""
    parts = name.split(".")
    if parts[0] == "blk":
        parts[1] = str(int(parts[1]) * n_src // n_new)
    return types[".".join(parts)]


def _random_tensor(name: str, dims: tuple, ggml_type) -> NewTensor:
    """Random weights of `ggml_type`: F32 vectors (norms, biases) are ones
    and zeros; quantized blocks are random bytes with small finite scales."""
    rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
    if ggml_type.name == "F32":
        value = 1.0 if name.endswith("norm.weight") else 0.0
        return NewTensor(name, tuple(reversed(dims)), np.float32, None,
                         lambda: np.full(tuple(reversed(dims)), value, np.float32))
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if ggml_type.name in K_FALLBACK and dims[0] % 256:
        ggml_type = GGMLQuantizationType[K_FALLBACK[ggml_type.name]]
    if ggml_type.name not in BLOCKS:
        raise ValueError(f"{name}: no stand-in for type {ggml_type.name}")
    block_bytes, scales = BLOCKS[ggml_type.name]
    per_block, _ = GGML_QUANT_SIZES[ggml_type]
    if dims[0] % per_block:
        raise ValueError(f"{name}: a row of {dims[0]} is not a whole number of {ggml_type.name} blocks")
    row_bytes = dims[0] // per_block * block_bytes

    def make() -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(name.encode()))  # the same file every time
        data = np.frombuffer(rng.bytes(rows * row_bytes), np.uint8).reshape(rows, row_bytes).copy()
        blocks = data.reshape(-1, block_bytes)
        for offset in scales:
            blocks[:, offset:offset + 2] = np.frombuffer(SCALE, np.uint8)
        return data

    return NewTensor(name, (rows, row_bytes), np.uint8, ggml_type, make)
