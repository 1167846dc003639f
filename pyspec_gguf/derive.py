"""Drafts built for scoring, made once from a GGUF file and cached: the same
weights in another quantization (llama.cpp's quantize API), or the model cut
to its first layers (written with `gguf`).

SpecPC's time to first token is bounded by the draft's prefill, and the
draft is only read for attention scores and a few drafted tokens: a
quantization whose CPU kernels are faster (Q4_0 repacks for AVX2), or fewer
layers (attention below the cut is exactly the full model's), costs less.
Each derived file lies in the cache directory's `derived/` beside a JSON
record of its source and its own sha256, checked before reuse.

    path = derived_draft("model.gguf", quant="q4_0", layers=16)
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np

from . import registry
from ._log import logger as log

QUANTS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k_m", "q5_k_m", "q6_k")


def derived_draft(path, quant: Optional[str] = None, layers: int = 0, threads: int = 0) -> Path:
    """The draft at `path`, requantized to `quant` and/or cut to its first
    `layers` layers (0: all), made on first use and cached."""
    path = Path(path)
    if quant:
        path = requantized(path, quant, threads)
    if layers:
        path = truncated(path, layers)
    return path


def requantized(src: Path, quant: str, threads: int = 0) -> Path:
    """`src`'s weights in `quant` (from its already quantized weights, as
    llama.cpp's quantize --allow-requantize does)."""
    quant = quant.lower()
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {', '.join(QUANTS)}, not {quant!r}")
    out = derived_path(src, quant)
    return made_once(src, out, {"quant": quant}, lambda tmp: _quantize(src, tmp, quant, threads))


def truncated(src: Path, layers: int) -> Path:
    """`src` cut to its first `layers` blocks: block_count = layers, the
    later blocks' tensors dropped. Attention in the kept layers is exactly
    the full model's; its logits (and so drafted tokens) are not."""
    out = derived_path(src, f"L{layers}")
    return made_once(src, out, {"layers": layers}, lambda tmp: _truncate(src, tmp, layers))


def derived_path(src: Path, tag: str) -> Path:
    return registry.cache_dir() / "derived" / f"{src.stem}.{tag}.gguf"


def made_once(src: Path, out: Path, how: dict, make) -> Path:
    record_path = out.with_suffix(".json")
    source = {"name": src.name, "size": src.stat().st_size}
    if out.exists() and record_path.exists():
        try:
            record = json.loads(record_path.read_text())
            if (record.get("source") == source and record.get("how") == how
                    and record.get("size") == out.stat().st_size and registry.sha256_file(out) == record["sha256"]):
                return out
        except (ValueError, KeyError, OSError):
            pass
        log.warning("the cached %s does not match its record; making it again", out.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        log.info("making %s from %s", out.name, src.name)
        make(tmp)
        record = {"source": source, "source_sha256": registry.sha256_file(src), "how": how,
                  "size": tmp.stat().st_size, "sha256": registry.sha256_file(tmp)}
        os.replace(tmp, out)
        record_path.write_text(json.dumps(record, indent=1) + "\n")
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _quantize(src: Path, dst: Path, quant: str, threads: int) -> None:
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = threads
    # ctypes releases the GIL for the call
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.exists():
        raise RuntimeError(f"llama.cpp could not quantize {src} to {quant} (code {rc})")


def _truncate(src: Path, dst: Path, layers: int) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(src)
    count_key = f"{reader.fields['general.architecture'].contents()}.block_count"
    n_layer = reader.fields[count_key].contents()
    if not 1 <= layers < n_layer:
        raise ValueError(f"layers must be in [1, {n_layer}) for this {n_layer}-layer model, not {layers}")
    copy_gguf(reader, dst, {count_key: layers}, drop=lambda name: _block_at_or_after(name, layers))


def copy_gguf(reader, dst: Path, changed: dict, drop=lambda name: False) -> None:
    """Write the GGUF that `reader` (a gguf.GGUFReader) reads to `dst`, with
    the metadata values in `changed` and without the tensors `drop` names."""
    tensors = [NewTensor(t.name, t.data.shape, t.data.dtype, t.tensor_type, lambda t=t: np.asarray(t.data))
               for t in reader.tensors if not drop(t.name)]
    write_gguf(reader, dst, changed, tensors)


class NewTensor(NamedTuple):
    """A tensor to write: its data's shape and numpy type (for a quantized
    type, uint8 rows of its blocks' bytes), its GGML type, and a function
    that makes the data when it is written (one tensor in memory at a time)."""
    name: str
    shape: tuple
    dtype: np.dtype
    ggml_type: object
    data: Callable[[], np.ndarray]


def write_gguf(reader, dst: Path, changed: dict, tensors: list) -> None:
    """A GGUF at `dst` with `reader`'s metadata (a gguf.GGUFReader's), the
    values in `changed` replacing or adding to it (new keys as uint32,
    float32 or string by their Python type, None: removed), and `tensors`."""
    from gguf import GGUFValueType, GGUFWriter

    writer = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # written by the writer itself
        value = changed.get(field.name, field.contents())
        if value is None:
            continue
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for key, value in changed.items():
        if key not in reader.fields and value is not None:
            kind = {int: GGUFValueType.UINT32, float: GGUFValueType.FLOAT32}.get(type(value), GGUFValueType.STRING)
            writer.add_key_value(key, value, kind)
    for t in tensors:
        nbytes = int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize
        writer.add_tensor_info(t.name, t.shape, np.dtype(t.dtype), nbytes, raw_dtype=t.ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.data())
    writer.close()


def _block_at_or_after(name: str, layers: int) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) >= layers
