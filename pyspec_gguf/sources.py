"""A document's text from what a user has: text, or a .txt, .md, .pdf or
.html file.

Text files are decoded from their bytes: a byte-order mark names the
encoding (UTF-8, UTF-16, UTF-32); without one, NUL bytes in the pattern of
UTF-16 or UTF-32 text of Latin script name those (text in other scripts
needs its byte-order mark: its byte order would be a guess), else UTF-8 is
tried, then the encoding charset-normalizer finds most likely (cp1252,
latin-1, Shift JIS, ...).
Whatever the decoding, text that still holds NUL or many other control
characters is binary and refused: a NUL would end the text where llama.cpp
reads it as a C string, and with it the question that follows the document.
Line endings become "\n".

PDFs are read with pypdf (pure Python, well kept, no system libraries);
HTML with Beautiful Soup over Python's own parser (pure Python, tolerant of
broken markup), keeping block structure as line breaks and leaving out
scripts, styles and other content that is not read.
"""

from __future__ import annotations

import codecs
import os
import re
import unicodedata
from pathlib import Path
from typing import Union

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")
SUFFIXES = TEXT_SUFFIXES + (".pdf", ".html", ".htm")

Source = Union[str, os.PathLike]


def looks_like_path(source: Source) -> bool:
    """A Path, or a one-line string that names an existing file or ends in a
    document suffix. Anything else is the document's text itself."""
    if isinstance(source, os.PathLike):
        return True
    if not isinstance(source, str):
        raise TypeError(f"a document is text or a path, not {type(source).__name__}")
    if not source or "\n" in source or len(source) > 4096:
        return False
    return os.path.isfile(source) or source.lower().endswith(SUFFIXES)


def read_source(source: Source) -> tuple[str, str]:
    """(text, name) of a document given as text or as a file path."""
    if not looks_like_path(source):
        text, name = source, "text"
        if "\0" in text:
            raise NotText("the document's text holds NUL characters: binary data, not text")
    else:
        path = Path(source).expanduser()
        name = path.name
        if not path.is_file():
            raise FileNotFoundError(f"no such document: {path}")
        suffix = path.suffix.lower()
        if suffix == ".pdf":
            text = read_pdf(path)
        elif suffix in (".html", ".htm"):
            text = read_html(decode_text(path.read_bytes(), name))
        elif suffix in TEXT_SUFFIXES:
            text = decode_text(path.read_bytes(), name)
        else:
            raise ValueError(f"{path}: unsupported document type {suffix or '(no suffix)'!r}; "
                             f"supported: {', '.join(SUFFIXES)}")
    if not text.strip():
        raise ValueError(f"the document {name!r} is empty" +
                         (" (a scanned PDF has no text layer: run OCR on it first)" if name.lower().endswith(".pdf")
                          else ""))
    return text, name


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))  # UTF-32 LE before UTF-16 LE
_WHITESPACE = "\t\n\r\f\v"
# bytes a UTF-16 or UTF-32 text without a byte-order mark needs before its NULs are believed
_MIN_SNIFFED = 32
# control characters a text may hold a few of (a stray escape, a form feed), but not more
_MAX_CONTROL_SHARE = 0.01


class NotText(ValueError):
    """Bytes that are not a text in any encoding found for them."""


def decode_text(data: bytes, name: str = "the document") -> str:
    """The text of a text file's bytes (see the module's docstring); a
    NotText error, never a cut or garbled text, where they are binary."""
    encoding, body = _bom(data)
    if encoding is None:
        encoding = _nul_pattern(data) if b"\0" in data else "utf-8"
        body = data
    try:
        text = body.decode(encoding) if encoding else None
    except UnicodeDecodeError:
        text = None
    if text is None and encoding == "utf-8":
        text, encoding = _detected(data)
    if text is None:
        if encoding is not None and encoding != "utf-8":
            raise NotText(f"{name}: not valid {encoding.upper()} text")
        raise NotText(f"{name} is not text: binary data, or text in an encoding that could not be "
                      "recognised (save it as UTF-8)")
    _check_text(text, name)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _bom(data: bytes) -> tuple:
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return encoding, data[len(bom):]
    return None, data


def _nul_pattern(data: bytes):
    """UTF-32 or UTF-16 without a byte-order mark, where its NUL bytes leave
    no doubt: in a text of Latin script the high bytes of (nearly) every
    character are NUL and no low byte is. None (binary, or too little to go
    by) for any other pattern of NULs."""
    def share(offset: int, step: int) -> float:
        lane = data[offset::step]
        return lane.count(0) / max(1, len(lane))

    if len(data) < _MIN_SNIFFED:
        return None
    if len(data) % 4 == 0:
        if min(share(2, 4), share(3, 4)) >= 0.9 and share(0, 4) == 0:
            return "utf-32-le"
        if min(share(0, 4), share(1, 4)) >= 0.9 and share(3, 4) == 0:
            return "utf-32-be"
    if len(data) % 2 == 0:
        if share(1, 2) >= 0.9 and share(0, 2) == 0:
            return "utf-16-le"
        if share(0, 2) >= 0.9 and share(1, 2) == 0:
            return "utf-16-be"
    return None


def _detected(data: bytes) -> tuple:
    """(text, encoding) in the legacy encoding charset-normalizer finds most
    likely, or (None, None). A UTF-16 or UTF-32 guess is not taken: without
    a byte-order mark or NULs to go by, its byte order would be a guess."""
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None or best.encoding.startswith(("utf_16", "utf_32")):
        return None, None
    return str(best), best.encoding


def _check_text(text: str, name: str) -> None:
    if "\0" in text:
        raise NotText(f"{name} holds NUL characters: binary data, not text")
    control = sum(1 for ch in text if ch not in _WHITESPACE and unicodedata.category(ch) in ("Cc", "Cs"))
    if control > _MAX_CONTROL_SHARE * len(text):
        raise NotText(f"{name} is not text: {control:,} of its {len(text):,} characters are control characters")


def read_pdf(path: Path) -> str:
    """The text of every page, pages separated by a blank line. Any failure
    to read it is an error that says why, never an empty text."""
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    locked = ValueError(f"{path}: the PDF is encrypted with a password")
    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise locked
        pages = [page.extract_text() or "" for page in reader.pages]
    except DependencyError as e:  # AES needs pypdf's crypto extra
        raise ValueError(f"{path}: this PDF needs a library pypdf could not load ({e}); "
                         "pip install \"pypdf[crypto]\"") from e
    except FileNotDecryptedError as e:
        raise locked from e
    except Exception as e:  # pypdf raises many kinds on a broken file
        if e is locked:
            raise
        raise ValueError(f"{path}: not a readable PDF ({type(e).__name__}: {e})") from e
    # control characters other than whitespace are artefacts of the extraction (and a NUL would cut the text)
    pages = [re.sub(r"[\x00-\x08\x0e-\x1f\x7f]", "", p).strip() for p in pages]
    return "\n\n".join(p for p in pages if p)


_NOT_READ = ("script", "style", "noscript", "template", "head", "svg")
_BLOCKS = ("p", "div", "section", "article", "header", "footer", "table", "ul", "ol", "dl", "pre", "blockquote",
           "h1", "h2", "h3", "h4", "h5", "h6", "figcaption")
_LINES = ("li", "tr", "br", "dt", "dd")


def read_html(markup: str) -> str:
    """Visible text of an HTML page: blocks (paragraphs, headings, lists,
    tables) are separated by a blank line, list items and table rows take a
    line each, table cells are separated by tabs."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(markup, "html.parser")
    for tag in soup(_NOT_READ):
        tag.decompose()
    for cell in soup(["td", "th"]):
        cell.insert_after("\t")
    for block in soup(_BLOCKS):
        block.insert_before("\n")
        block.insert_after("\n")
    for line in soup(_LINES):
        line.insert_after("\n")
    text = soup.get_text()
    lines = [re.sub(r"[ \r\f\v]+", " ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
