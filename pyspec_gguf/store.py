"""Saved draft states of documents, so a document read once is not read
again in the next process.

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
import time
from pathlib import Path

import numpy as np

from .registry import cache_dir

MAGIC = b"PSGDOC\n\0"
FORMAT = 1
_PREFIX = struct.Struct("<8sII")


class StateFileError(ValueError):
    """A saved state that cannot be used: corrupt, truncated, or another
    model's or document's."""


def documents_dir() -> Path:
    return cache_dir() / "documents"


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
