"""Saved draft states, so a prompt read once is not read again in the next
process: a document's (`Document.save`), and a server's (`StateStore`: the
draft's prefix caches written to a bounded folder, found again by the
longest common token prefix).

A file is a header, the token ids the state holds, and the state
(llama.cpp's sequence state) itself:

    magic "PSGDOC\\n\\0" | u32 format | u32 header length | header (JSON)
    | int32 token ids | state

The header names the draft model's sha256, the token ids' sha256 and the
state's length and sha256. A file whose magic, format, model, tokens or
checksum do not match is refused (StateFileError) and never handed to
llama.cpp. Files are written to a temporary name and renamed, so a crash
leaves the old file or none, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ._log import logger as log
from .prefix import common_prefix
from .registry import cache_dir

MAGIC = b"PSGDOC\n\0"
FORMAT = 1
_PREFIX = struct.Struct("<8sII")


class StateFileError(ValueError):
    """A saved state that cannot be used: corrupt, truncated, or another
    model's or document's."""


# where saved states go (default: the cache folder's documents/)
STATES_ENV = "PYSPEC_GGUF_STATES"


def documents_dir() -> Path:
    folder = os.environ.get(STATES_ENV)
    return Path(folder).expanduser() if folder else cache_dir() / "documents"


def tokens_sha256(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i4").tobytes()).hexdigest()


def state_path(tokens: np.ndarray, draft_path: str) -> Path:
    """Where the state of `tokens` on a draft is kept: named by the tokens
    and the draft file's name and size (the header holds its sha256)."""
    stem = Path(draft_path).stem[:40]
    return documents_dir() / f"{tokens_sha256(tokens)[:24]}-{stem}-{os.path.getsize(draft_path)}.psgdoc"


def write_state(path: Path, tokens: np.ndarray, state: bytes, draft_sha256: str, name: str = "") -> None:
    tokens = np.ascontiguousarray(tokens, dtype="<i4")
    header = json.dumps({
        "draft_sha256": draft_sha256, "tokens_sha256": tokens_sha256(tokens), "n_tokens": len(tokens),
        "state_bytes": len(state), "state_sha256": hashlib.sha256(state).hexdigest(),
        "name": name, "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, FORMAT, len(header)))
            f.write(header)
            f.write(tokens.tobytes())
            f.write(state)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_header(path: Path) -> tuple:
    """(header, token ids) of a saved state, without reading the state;
    StateFileError where the file is not one."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                raise StateFileError(f"{path}: truncated ({len(prefix)} bytes)")
            magic, fmt, n_header = _PREFIX.unpack(prefix)
            if magic != MAGIC or fmt != FORMAT:
                raise StateFileError(f"{path}: not a pyspec-gguf state of format {FORMAT}")
            header = json.loads(f.read(n_header))
            n_tokens = int(header["n_tokens"])
            tokens = np.frombuffer(f.read(4 * n_tokens), dtype="<i4")
    except OSError as e:
        raise StateFileError(f"{path}: cannot read ({e})") from e
    except (ValueError, KeyError, TypeError) as e:
        raise StateFileError(f"{path}: unreadable header ({e})") from e
    if len(tokens) != n_tokens:
        raise StateFileError(f"{path}: truncated")
    return header, tokens


def read_state(path: Path, tokens: np.ndarray, draft_sha256: str) -> bytes:
    """The state saved in `path` for `tokens` on the draft `draft_sha256`,
    after every check; StateFileError says which one failed."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StateFileError(f"{path}: cannot read ({e})") from e
    if len(data) < _PREFIX.size:
        raise StateFileError(f"{path}: truncated ({len(data)} bytes)")
    magic, fmt, n_header = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise StateFileError(f"{path}: not a pyspec-gguf document state")
    if fmt != FORMAT:
        raise StateFileError(f"{path}: format {fmt}, this version reads format {FORMAT}")
    try:
        header = json.loads(data[_PREFIX.size:_PREFIX.size + n_header])
        n_tokens, n_state = int(header["n_tokens"]), int(header["state_bytes"])
    except (ValueError, KeyError, TypeError) as e:
        raise StateFileError(f"{path}: unreadable header ({e})") from e
    if header.get("draft_sha256") != draft_sha256:
        raise StateFileError(f"{path}: saved with another draft model (sha256 {str(header.get('draft_sha256'))[:12]}…, "
                             f"this draft's is {draft_sha256[:12]}…)")
    start = _PREFIX.size + n_header
    end = start + 4 * n_tokens
    if len(data) != end + n_state:
        raise StateFileError(f"{path}: {len(data)} bytes, its header says {end + n_state} (truncated or padded)")
    saved = np.frombuffer(data[start:end], dtype="<i4")
    if tokens_sha256(saved) != header.get("tokens_sha256"):
        raise StateFileError(f"{path}: the token ids do not match their checksum")
    if len(saved) != len(tokens) or not np.array_equal(saved, tokens):
        raise StateFileError(f"{path}: saved for another document")
    state = data[end:]
    if hashlib.sha256(state).hexdigest() != header.get("state_sha256"):
        raise StateFileError(f"{path}: the state does not match its checksum (corrupt)")
    return state


class StateStore:
    """The draft's states in one folder, at most `max_bytes` of them: the
    least recently used go first. `find` gives the saved state sharing the
    longest token prefix with a prompt, `save` writes one (and drops the
    states it extends, which it holds whole). The files are those of
    `Document.save`, so each finds the other's. Every state is checked as
    `read_state` checks it before llama.cpp sees it; a bad file is skipped
    and removed."""

    def __init__(self, folder: Path, draft, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the state store's bound must be >= 0 bytes, not {max_bytes}")
        self.folder, self.draft, self.max_bytes = Path(folder).expanduser(), draft, max_bytes
        self._index: dict = {}  # path -> (mtime, size, token ids) of this draft's states
        self._lock = threading.Lock()

    def find(self, tokens: np.ndarray) -> tuple:
        """(common prefix, path, the state's token ids) of the saved state
        sharing the longest token prefix with `tokens` ((0, None, None):
        none shares any)."""
        with self._lock:
            best = (0, None, None)
            for path, (_, _, saved) in self._scan().items():
                n = common_prefix(saved, tokens)
                if n > best[0]:
                    best = (n, path, saved)
            return best

    def load(self, path: Path, saved: np.ndarray) -> Optional[bytes]:
        """The state in `path` (None where it fails a check: it is removed)."""
        try:
            blob = read_state(path, saved, self.draft.sha256())
        except StateFileError as e:
            log.warning("a saved draft state is unusable and was removed: %s", e)
            with self._lock:
                self._remove(path)
            return None
        try:
            os.utime(path)  # used: the last to be evicted
        except OSError:
            pass
        return blob

    def save(self, tokens: np.ndarray, state: bytes) -> Optional[Path]:
        """Write the state of `tokens`; the states whose tokens it extends
        are dropped, then the least recently used beyond the bound."""
        if len(state) > self.max_bytes:
            return None
        path = self.folder / state_path(tokens, self.draft.path).name
        write_state(path, tokens, state, self.draft.sha256(), "server")
        with self._lock:
            for other, (_, _, saved) in list(self._scan().items()):
                if other != path and len(saved) < len(tokens) and common_prefix(saved, tokens) == len(saved):
                    self._remove(other)
            self._evict()
        return path

    def _scan(self) -> dict:
        """This draft's states in the folder, their headers read once."""
        seen = {}
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            entries = []
        for entry in entries:
            if not entry.name.endswith(".psgdoc"):
                continue
            path = Path(entry.path)
            try:
                stat = entry.stat()
            except OSError:
                continue
            known = self._index.get(path)
            if known is not None and known[0] == stat.st_mtime_ns and known[1] == stat.st_size:
                seen[path] = known
                continue
            try:
                header, saved = read_header(path)
            except StateFileError:
                continue
            if header.get("draft_sha256") == self.draft.sha256():
                seen[path] = (stat.st_mtime_ns, stat.st_size, saved)
        self._index = seen
        return seen

    def _evict(self) -> None:
        """The least recently used files of the folder (any model's), until
        what is left fits the bound."""
        files = []
        for entry in os.scandir(self.folder):
            if entry.name.endswith(".psgdoc"):
                try:
                    files.append((entry.stat().st_mtime_ns, entry.stat().st_size, Path(entry.path)))
                except OSError:
                    pass
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            self._remove(path)
            total -= size

    def _remove(self, path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass
        self._index.pop(path, None)
