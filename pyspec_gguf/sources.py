"""A document's text from what a user has: text, or a .txt, .md, .pdf or
.html file.

PDFs are read with pypdf (pure Python, well kept, no system libraries);
HTML with Beautiful Soup over Python's own parser (pure Python, tolerant of
broken markup), keeping block structure as line breaks and leaving out
scripts, styles and other content that is not read.
"""

from __future__ import annotations

import os
import re
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
    else:
        path = Path(source).expanduser()
        name = path.name
        if not path.is_file():
            raise FileNotFoundError(f"no such document: {path}")
        suffix = path.suffix.lower()
        if suffix == ".pdf":
            text = read_pdf(path)
        elif suffix in (".html", ".htm"):
            text = read_html(path.read_text(encoding="utf-8", errors="replace"))
        elif suffix in TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8", errors="replace")
        else:
            raise ValueError(f"{path}: unsupported document type {suffix or '(no suffix)'!r}; "
                             f"supported: {', '.join(SUFFIXES)}")
    if not text.strip():
        raise ValueError(f"the document {name!r} is empty" +
                         (" (a scanned PDF has no text layer: run OCR on it first)" if name.lower().endswith(".pdf")
                          else ""))
    return text, name


def read_pdf(path: Path) -> str:
    """The text of every page, pages separated by a blank line."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise ValueError(f"{path}: the PDF is encrypted with a password")
        pages = [page.extract_text() or "" for page in reader.pages]
    except PdfReadError as e:
        raise ValueError(f"{path}: not a readable PDF ({e})") from e
    return "\n\n".join(p.strip() for p in pages if p.strip())


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
