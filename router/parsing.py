"""Turns document bytes into plain text: txt, md, html, pdf."""

from __future__ import annotations

import html
import io
import re
from html.parser import HTMLParser
from pathlib import PurePath

from fabric.errors import InvalidArgument

FORMATS = ("txt", "md", "html", "pdf")
_EXTENSIONS = {
    ".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md",
    ".html": "html", ".htm": "html", ".pdf": "pdf",
}


def format_for(source: str, declared: str = "") -> str:
    """The parser to use: the declared format, else the source's extension, else plain text."""
    if declared:
        fmt = declared.lower().lstrip(".")
        fmt = {"markdown": "md", "htm": "html", "text": "txt"}.get(fmt, fmt)
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {declared!r}; expected one of {', '.join(FORMATS)}")
        return fmt
    return _EXTENSIONS.get(PurePath(source).suffix.lower(), "txt")


def title_for(source: str) -> str:
    """What a document is called, from its source: 'docs/rosetta-stone.txt' → 'rosetta stone',
    'shred.1.txt' → 'shred 1'. Chunks are embedded and reranked with it, since most of a document's
    sentences never name what they are about."""
    if source.startswith("sha256:"):  # an id made from the body's hash names nothing
        return ""
    name = PurePath(source.split("?", 1)[0].rstrip("/")).name
    while PurePath(name).suffix.lower() in (*_EXTENSIONS, ".gz"):
        name = name[: -len(PurePath(name).suffix)]
    return " ".join(re.split(r"[-_.\s]+", name)).strip()


def supported(path: str) -> bool:
    return PurePath(path).suffix.lower() in _EXTENSIONS


def parse(content: bytes | str, fmt: str, field: str = "document") -> str:
    """Plain text of a document; raises InvalidArgument naming `field` if it cannot be read."""
    if fmt == "pdf":
        text = _pdf(content if isinstance(content, bytes) else content.encode(), field)
    else:
        raw = content if isinstance(content, str) else _decode(content, field)
        text = {"html": _html, "md": _markdown}.get(fmt, lambda t: t)(raw)
    text = normalise_whitespace(text)
    if not text:
        raise InvalidArgument(field, "no text found in the document")
    return text


def normalise_whitespace(text: str) -> str:
    """Collapses runs of spaces; keeps paragraph breaks (blank lines) as one blank line."""
    paragraphs = re.split(r"\n\s*\n", text.replace("\r\n", "\n").replace("\x00", ""))
    return "\n\n".join(p for p in (" ".join(par.split()) for par in paragraphs) if p)


def _decode(data: bytes, field: str) -> str:
    if b"\x00" in data[:4096]:
        raise InvalidArgument(field, "looks like a binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(field, f"not valid UTF-8 text (byte {exc.start})") from None


def _markdown(text: str) -> str:
    text = re.sub(r"```.*?\n(.*?)```", r"\1", text, flags=re.S)  # keep code, drop fences
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", text)  # images → alt text
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # links → their text
    text = re.sub(r"^[ \t]{0,3}(#{1,6}|>|[-*+]|\d+\.)[ \t]+", "", text, flags=re.M)  # headings, quotes, list markers
    text = re.sub(r"(\*\*|__|\*|_|`)(\S.*?\S|\S)\1", r"\2", text)  # emphasis, inline code
    return text


class _TextExtractor(HTMLParser):
    _SKIP = {"script", "style", "noscript", "template", "head", "svg"}
    _BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "section", "article",
              "blockquote", "pre", "title", "table", "ul", "ol", "header", "footer"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self._in_title = True
        elif tag in self._SKIP:
            self._skip += 1
        if tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag in self._SKIP and self._skip:
            self._skip -= 1
        if tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(data)


def _html(text: str) -> str:
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    body = "".join(parser.parts)
    title = html.unescape(parser.title).strip()
    return f"{title}\n\n{body}" if title and title not in body else body


def _pdf(data: bytes, field: str) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            raise InvalidArgument(field, "the PDF is encrypted")
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except InvalidArgument:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError, AttributeError, IndexError) as exc:
        raise InvalidArgument(field, f"cannot read the PDF: {exc}") from None
