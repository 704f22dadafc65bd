"""Sections to overlapping chunks that follow the document's structure.

A chunk never spans two sections (so never crosses a heading). Inside a section,
whole paragraphs are packed up to `target` characters; a paragraph longer than
that is cut (into pieces short enough to leave room for the overlap) at a sentence
end, else at a space, never inside a word. Each chunk
after the first of its section starts with the last `overlap` characters or
fewer (from a word start) of the previous chunk's last piece, so a fact that
straddles a cut is whole in one of the two.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import msgspec

from actors.knowledge.parse import Section

__all__ = ["OVERLAP", "TARGET", "Chunk", "chunk_sections"]

#: Characters a chunk aims at (it may exceed it only by an unbreakable word).
TARGET = 800
#: Characters repeated from the end of the previous chunk.
OVERLAP = 150

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"[.!?;:](?=\s)|\n")


class Chunk(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of a document and where it starts (character offset in its page or file)."""

    text: str
    heading: tuple[str, ...]
    offset: int
    page: int | None = None


def chunk_sections(
    sections: Iterable[Section], *, target: int = TARGET, overlap: int = OVERLAP
) -> list[Chunk]:
    """The chunks of a document's sections, in reading order."""
    if not 0 <= overlap < target:
        raise ValueError("overlap must be smaller than target")
    out: list[Chunk] = []
    for section in sections:
        out.extend(_chunk_section(section, target, overlap))
    return out


def _pieces(text: str, target: int, cut_to: int) -> list[tuple[int, str]]:
    """(offset, text) of paragraphs; one longer than `target` is cut into pieces of
    at most `cut_to` (leaving room for the overlap) at sentence ends or spaces."""
    pieces: list[tuple[int, str]] = []
    start = 0
    for m in [*_PARAGRAPH_BREAK.finditer(text), None]:
        end = m.start() if m else len(text)
        para = text[start:end]
        lead = len(para) - len(para.lstrip())
        para = para.strip()
        at = start + lead
        while para:
            if len(para) <= target:
                pieces.append((at, para))
                break
            cut = _cut(para, cut_to)
            head, rest = para[:cut].rstrip(), para[cut:]
            pieces.append((at, head))
            skip = len(rest) - len(rest.lstrip())
            at += cut + skip
            para = rest.lstrip()
        if m:
            start = m.end()
    return pieces


def _cut(text: str, target: int) -> int:
    """Where to cut `text` to a head of at most `target` characters, never mid-word."""
    window = text[: target + 1]
    ends = [m.end() for m in _SENTENCE_END.finditer(window) if m.end() >= target // 2]
    if ends:
        return ends[-1]
    space = window.rfind(" ", target // 4)
    if space > 0:
        return space
    # One word longer than the whole window: cut after it rather than inside it.
    m = re.search(r"\s", text[target:])
    return target + m.start() if m else len(text)


def _tail(offset: int, text: str, overlap: int) -> tuple[int, str]:
    """The last `overlap` characters or fewer of `text`, starting at a word."""
    if len(text) <= overlap:
        return offset, text
    start = len(text) - overlap
    if not text[start - 1].isspace():
        nxt = re.search(r"\s", text[start:])
        if nxt is None:
            return offset + len(text), ""
        start += nxt.end()
    while start < len(text) and text[start].isspace():
        start += 1
    return offset + start, text[start:]


def _chunk_section(section: Section, target: int, overlap: int) -> list[Chunk]:
    # A chunk is a verbatim span of the section: from its first piece to its last.
    text = section.text
    chunks: list[Chunk] = []
    current: list[tuple[int, str]] = []

    def span(pieces: list[tuple[int, str]]) -> tuple[int, int]:
        return pieces[0][0], pieces[-1][0] + len(pieces[-1][1])

    def flush() -> None:
        if current:
            start, end = span(current)
            chunks.append(
                Chunk(
                    text=text[start:end],
                    heading=section.heading,
                    offset=section.offset + start,
                    page=section.page,
                )
            )

    for at, piece in _pieces(text, target, max(target - overlap - 2, target // 2)):
        if current and at + len(piece) - current[0][0] > target:
            flush()
            tail_at, tail = _tail(*current[-1], overlap) if overlap else (0, "")
            current = [(tail_at, tail)] if tail else []
            if current and at + len(piece) - tail_at > target:
                # No room for the overlap: the piece alone is a chunk.
                current = []
        current.append((at, piece))
    flush()
    return chunks
