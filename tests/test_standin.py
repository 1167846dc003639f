"""Stand-in targets: a bigger model's published shapes with the source
file's types, tokenizer and random weights, for timing only."""

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

import pyspec_gguf
from pyspec_gguf import registry
from pyspec_gguf.bench import report, standin
from pyspec_gguf.bench.common import machine
from pyspec_gguf.cli.main import main
from pyspec_gguf.derive import write_gguf


def _plan_bytes(tensors) -> int:
    return sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in tensors)


def test_only_a_qwen2_file_makes_a_stand_in(small_path):
    with pytest.raises(ValueError, match="made from a qwen2 GGUF, not llama"):
        standin.standin_tensors(GGUFReader(small_path), standin.SHAPES["qwen2.5-7b"])


def _tiny_qwen2(path, tmp_path):
    """A two-layer qwen2 GGUF with Q8_0 weights and F32 vectors."""
    from gguf import GGMLQuantizationType, GGUFWriter

    base = tmp_path / "base.gguf"
    writer = GGUFWriter(base, "qwen2")
    writer.add_block_count(2)
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    q8, f32 = GGMLQuantizationType.Q8_0, GGMLQuantizationType.F32
    tensors = [standin._random_tensor(name, dims, f32 if len(dims) == 1 else q8)
               for name, dims in standin._tensor_shapes(standin.Shape(32, 64, 2, 4, 2), vocab=64)]
    write_gguf(GGUFReader(base), path, {}, tensors)
    return path


def test_a_seed_makes_the_stand_in_its_source_makes(tmp_path, small_path):
    """A seed holds the source's metadata and tensor types and no weights;
    a stand-in made from it is its source's, byte for byte."""
    source = _tiny_qwen2(tmp_path / "tiny.gguf", tmp_path)
    seed = tmp_path / "tiny.seed.gguf"
    standin.write_seed(source, seed)
    read = GGUFReader(seed)
    assert len(read.tensors) == 0 and read.fields["tokenizer.chat_template"].contents() == "{{ messages }}"
    for shape in standin.SHAPES.values():
        a, b = (standin.standin_tensors(GGUFReader(f), shape) for f in (source, seed))
        assert [(t.name, t.shape, t.ggml_type) for t in a] == [(t.name, t.shape, t.ggml_type) for t in b]
    made = []
    for f in (source, seed):
        standin._write_standin(f, tmp_path / f"{f.stem}.made.gguf", "tiny", standin.Shape(64, 128, 3, 4, 2))
        made.append((tmp_path / f"{f.stem}.made.gguf").read_bytes())
    assert made[0] == made[1]
    with pytest.raises(ValueError, match="made from a qwen2 GGUF, not llama"):
        standin.write_seed(small_path, tmp_path / "llama.seed.gguf")


def test_a_stand_in_is_made_from_the_file_the_environment_names(tmp_path, monkeypatch):
    """Where the default target cannot be fetched (a GPU machine with no
    network), PYSPEC_STANDIN_SOURCE names a seed to make stand-ins from."""
    source = _tiny_qwen2(tmp_path / "tiny.gguf", tmp_path)
    seed = tmp_path / "tiny.seed.gguf"
    standin.write_seed(source, seed)
    monkeypatch.setitem(standin.SHAPES, "tiny-3l", standin.Shape(64, 128, 3, 4, 2))
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(standin.SOURCE_ENV, str(seed))
    made = standin.model_path("standin:tiny-3l")
    assert GGUFReader(made).fields["qwen2.block_count"].contents() == 3
    monkeypatch.setenv(standin.SOURCE_ENV, str(source))
    assert Path(standin.model_path("standin:tiny-3l")).read_bytes() == Path(made).read_bytes()


def test_bad_stand_in_requests_are_refused_before_anything_loads(no_model_loads):
    assert main(["bench", "--target", "standin:qwen2.5-70b"]) == 2
    assert main(["bench", "--target", "standin:qwen2.5-7b", "--only", "answers"]) == 2


def _timing(variant, budget, ttft, target):
    return {"kind": "timing", "models": {"draft": "qwen-0.5b", "target": target}, "context_tokens": 8192,
            "variant": variant, "budget": budget, "run": 0, "task": "niah_single", "seed": 0,
            "machine": machine(), "command": "c", "ttft_s": ttft, "prompt_tokens": 8100,
            "times": {"draft_prefill": 80.0 if target.startswith("qwen") else 100.0}, "target_kv_bytes": 100, "peak_rss_bytes": 10,
            "decode_tok_s": 5.0, "answer": "noise"}


def test_a_stand_in_is_timed_against_its_own_full_and_never_scored(tmp_path):
    real, big = "qwen-1.5b", "standin:qwen2.5-7b"
    rows = [_timing("full", 0, 100.0, real), _timing("specpc", 1024, 80.0, real),
            _timing("full", 0, 800.0, big), _timing("specpc", 1024, 200.0, big)]
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    built = {r["method"]: r for r in report.build(runs, tmp_path, "full")}
    assert built["specpc"]["ttft_vs_full"] == pytest.approx(0.8)
    assert built["specpc [standin qwen2.5-7b]"]["ttft_vs_full"] == pytest.approx(0.25)
    assert built["full [standin qwen2.5-7b]"]["accuracy"] is None
    md = (tmp_path / "latest.md").read_text()
    assert "## Time to first token by target size" in md
    assert "| standin:qwen2.5-7b (stand-in: times only) | 8192 | 800.0 (1 run) | 200.0 (1 run) | 0.25 | 50% |" in md
    assert "| qwen-1.5b | 8192 | 100.0 (1 run) | 80.0 (1 run) | 0.80 | 100% |" in md
    # an answer row of a stand-in would put noise in an accuracy table
    answer = {**rows[2], "kind": "answer", "score": 0.0, "expected": ["x"], "target_kv_bytes": 1, "kv_cells": 1}
    with open(runs, "a") as f:
        f.write(json.dumps(answer) + "\n")
    with pytest.raises(ValueError, match="stand-in's answers are noise"):
        report.build(runs, tmp_path, "full")


def test_each_target_keeps_the_machine_it_was_timed_on(tmp_path):
    """A stand-in timed at one length on one machine keeps its rows when the
    real target is timed at that length, with more methods, on another; the
    table names each row's machine."""
    real, big = "qwen-1.5b", "standin:qwen2.5-7b"
    avx2 = {**machine(), "cores": 2, "llama_system_info": "CPU : AVX2 = 1 |", "cpu_family": "25", "cpu_model": "1"}
    avx512 = {**avx2, "llama_system_info": "CPU : AVX2 = 1 | AVX512 = 1 |", "cpu_family": "25", "cpu_model": "17"}
    rows = [{**_timing(v, b, t, big), "machine": avx2} for v, b, t in [("full", 0, 900.0), ("specpc", 1024, 220.0)]]
    rows += [{**_timing(v, b, t, real), "machine": avx512}
             for v, b, t in [("full", 0, 200.0), ("specpc", 1024, 120.0), ("speckv_pc", 1024, 150.0)]]
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    built = {r["method"]: r for r in report.build(runs, tmp_path, "full")}
    assert built["specpc [standin qwen2.5-7b]"]["ttft_vs_full"] == pytest.approx(220 / 900)
    assert built["specpc"]["ttft_vs_full"] == pytest.approx(0.6)
    assert built["full [standin qwen2.5-7b]"]["timing_machine"].endswith("AVX2")
    assert built["full"]["timing_machine"].endswith("AVX512")
    md = (tmp_path / "latest.md").read_text()
    assert "| standin:qwen2.5-7b (stand-in: times only) | 8192 | 900.0 (1 run) |" in md
    assert "timed on |" in md and "model 17), 2 cores, AVX512 |" in md and "model 1), 2 cores, AVX2 |" in md


# ------------------------------------------------------------ on the real pair

@pytest.fixture(scope="module")
def target_file():
    return registry.resolve(registry.default_model("target"), progress=False)


@pytest.mark.slow
def test_stand_in_shapes_are_the_published_ones(target_file):
    """The 7B plan: Qwen2.5-7B's 339 tensors, within 2% of the real
    Q4_K_M file's 4.68 GB; every size's tensors have its shapes."""
    source = GGUFReader(target_file)
    seven = standin.SHAPES["qwen2.5-7b"]
    tensors = standin.standin_tensors(source, seven)
    assert len(tensors) == 339
    assert abs(_plan_bytes(tensors) / seven.q4_k_m_bytes - 1) < 0.02
    for shape in standin.SHAPES.values():
        dims = {t.name: t for t in standin.standin_tensors(source, shape)}
        assert len(dims) == 3 + 12 * shape.layers
        head = shape.hidden // shape.heads
        assert dims["blk.0.attn_k.bias"].shape == (head * shape.kv_heads,)
        assert dims["blk.0.ffn_up.weight"].shape[0] == shape.ffn


@pytest.mark.slow
def test_the_0_5b_stand_in_is_the_real_0_5b_but_its_weights(target_file, tmp_path, monkeypatch):
    """Made from the 1.5B with the 0.5B's shapes: the same tensors and
    element shapes as the real 0.5B draft file, its size within 2%, and
    llama.cpp loads it and prefills with it."""
    monkeypatch.setattr("pyspec_gguf.registry.cache_dir", lambda: tmp_path)
    path = standin.standin_target(target_file, "qwen2.5-0.5b")
    real_path = registry.resolve(registry.default_model("draft"), progress=False)
    made, real = GGUFReader(path), GGUFReader(real_path)
    assert {t.name: tuple(t.shape) for t in made.tensors} == {t.name: tuple(t.shape) for t in real.tensors}
    assert abs(path.stat().st_size / real_path.stat().st_size - 1) < 0.02
    assert standin.standin_target(target_file, "qwen2.5-0.5b") == path  # cached: its record matches
    with pyspec_gguf.Model(str(path), progress=False) as model, model.context(n_ctx=512) as ctx:
        assert model.n_layer == 24
        tokens = model.tokenize("A stand-in reads this sentence. " * 20)
        assert np.isfinite(ctx.prefill(tokens, want="logprobs")).all()
