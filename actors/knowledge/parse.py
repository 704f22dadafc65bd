"""Files to sections of text, each under its heading path.

Plain text and Markdown keep their own characters (offsets point into the file);
HTML keeps the visible text of the body with headings and block breaks
(script, style and the like are dropped); PDF is read page by page with pypdf.
A section's paragraphs are separated by blank lines, which is what `chunk` splits on.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import msgspec

__all__ = [
    "SUFFIXES",
    "Section",
    "UnsupportedFile",
    "parse",
    "parse_html",
    "parse_markdown",
    "parse_pdf",
]

#: File suffixes `parse` reads (lower case).
SUFFIXES = frozenset({".txt", ".text", ".md", ".markdown", ".html", ".htm", ".pdf"})

_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


class UnsupportedFile(ValueError):
    """A file whose suffix `parse` does not read."""


class Section(msgspec.Struct, frozen=True, kw_only=True):
    """Text under one heading path; `offset` is where `text` starts in its page or file."""

    heading: tuple[str, ...]
    text: str
    offset: int = 0
    page: int | None = None  # 1-based, PDFs only


def parse(path: Path, data: bytes | None = None) -> list[Section]:
    """Sections of the file at `path` (`data`: its bytes, when already read)."""
    suffix = path.suffix.lower()
    raw = path.read_bytes() if data is None else data
    if suffix == ".pdf":
        return parse_pdf(raw)
    text = raw.decode("utf-8", errors="replace")
    if suffix in (".md", ".markdown"):
        return parse_markdown(text)
    if suffix in (".html", ".htm"):
        return parse_html(text)
    if suffix in (".txt", ".text"):
        return [Section(heading=(), text=text)] if text.strip() else []
    raise UnsupportedFile(f"cannot read {suffix or 'suffix-less'} files: {path}")


def parse_markdown(text: str) -> list[Section]:
    """Split on ATX headings (`#` .. `######`), outside fenced code blocks."""
    sections: list[Section] = []
    path: list[tuple[int, str]] = []  # (level, title)
    start = 0
    fence: str | None = None
    pos = 0
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\r\n")
        opened = _FENCE.match(stripped)
        if fence is not None:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence):
                fence = None
        elif opened:
            fence = opened.group(1)
        elif m := _ATX.match(stripped):
            _emit(sections, path, text[start:pos], start)
            level = len(m.group(1))
            path = [(lv, t) for lv, t in path if lv < level] + [(level, m.group(2).strip())]
            start = pos + len(line)
        pos += len(line)
    _emit(sections, path, text[start:], start)
    return sections


def _emit(sections: list[Section], path: list[tuple[int, str]], body: str, offset: int) -> None:
    if body.strip():
        sections.append(Section(heading=tuple(t for _, t in path), text=body, offset=offset))


_SKIP = frozenset({"script", "style", "noscript", "template", "head", "svg", "iframe", "object"})
_VOID = frozenset(
    {
        "br",
        "hr",
        "img",
        "input",
        "meta",
        "link",
        "area",
        "base",
        "col",
        "embed",
        "source",
        "track",
        "wbr",
    }
)
_BLOCK = frozenset(
    {
        "p",
        "div",
        "section",
        "article",
        "main",
        "aside",
        "header",
        "footer",
        "nav",
        "li",
        "ul",
        "ol",
        "dl",
        "dt",
        "dd",
        "table",
        "tr",
        "pre",
        "blockquote",
        "figure",
        "figcaption",
        "form",
        "fieldset",
        "details",
        "summary",
        "address",
        "br",
        "hr",
        "body",
        "td",
        "th",
    }
)
_HEADINGS = {f"h{i}": i for i in range(1, 7)}


class _HtmlText(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[Section] = []
        self.title = ""
        self._path: list[tuple[int, str]] = []
        self._buf: list[str] = []
        self._skip = 0
        self._heading: tuple[int, list[str]] | None = None
        self._in_title = False
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        if tag in _SKIP:
            if tag not in _VOID:
                self._skip += 1
            return
        if self._skip:
            return
        if tag in _HEADINGS:
            self._flush()
            self._heading = (_HEADINGS[tag], [])
        elif tag in _BLOCK:
            self._buf.append("\n" if tag in ("br", "td", "th") else "\n\n")
        if tag == "pre":
            self._pre += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if tag in _SKIP:
            self._skip = max(0, self._skip - 1)
            return
        if self._skip:
            return
        if tag in _HEADINGS and self._heading is not None:
            level, words = self._heading
            title = " ".join("".join(words).split())
            self._heading = None
            if title:
                self._path = [(lv, t) for lv, t in self._path if lv < level] + [(level, title)]
        elif tag in _BLOCK:
            self._buf.append("\n\n")
        if tag == "pre":
            self._pre = max(0, self._pre - 1)

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._skip:
            return
        if self._heading is not None:
            self._heading[1].append(data)
        elif self._pre:
            self._buf.append(data.replace("\n\n", "\n"))
        else:
            self._buf.append(re.sub(r"\s+", " ", data))

    def _flush(self) -> None:
        raw = "".join(self._buf)
        self._buf = []
        paragraphs = [
            " ".join(p.split()) if "\n" not in p.strip() else p.strip()
            for p in re.split(r"\n\s*\n", raw)
        ]
        text = "\n\n".join(p for p in paragraphs if p.strip())
        if text:
            offset = sum(len(s.text) + 2 for s in self.sections)
            self.sections.append(
                Section(heading=tuple(t for _, t in self._path), text=text, offset=offset)
            )

    def close(self) -> None:
        super().close()
        self._flush()


def parse_html(text: str) -> list[Section]:
    """Visible text under h1-h6 headings; offsets count in the extracted text."""
    parser = _HtmlText()
    parser.feed(text)
    parser.close()
    return parser.sections


def parse_pdf(data: bytes) -> list[Section]:
    """One section per page with text; headings are not recoverable from PDF text."""
    import io

    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data))
    sections: list[Section] = []
    for number, page in enumerate(reader.pages, 1):
        text = page.extract_text() or ""
        if text.strip():
            sections.append(Section(heading=(), text=text, page=number))
    return sections


def page_count(sections: list[Section]) -> int:
    """Pages covered by sections (PDF pages; 1 for any other non-empty document)."""
    pages = {s.page for s in sections if s.page is not None}
    return max(pages) if pages else (1 if sections else 0)
