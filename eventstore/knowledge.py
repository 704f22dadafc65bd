"""Knowledge events: what entered and left a collection, with the chunks as ingested.

The chunks travel in the event, so the index is rebuilt from the log alone (no
file is read again, and a file that changed on disk since does not leak in).
A large document is written as several DocumentAdded events of the same
(path, sha256), each carrying the chunks numbered from `first`.
Tags are permanent: never rename them.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import assert_never

import msgspec

from bus.codec import Codec

__all__ = [
    "CODEC",
    "ChunkData",
    "DocumentAdded",
    "DocumentRemoved",
    "KbEvent",
    "Position",
    "chunk_id",
    "documents",
]


class Position(msgspec.Struct, frozen=True, kw_only=True):
    """Where a chunk starts: character offset in the file (text, Markdown), in the
    extracted text (HTML) or in the page's extracted text (PDF, with its 1-based page)."""

    offset: int
    page: int | None = None


class ChunkData(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    position: Position
    heading: tuple[str, ...] = ()


class DocumentAdded(
    msgspec.Struct, frozen=True, kw_only=True, tag="kb.document_added", tag_field="type"
):
    collection: str
    path: str
    sha256: str
    chunks: tuple[ChunkData, ...]
    at: datetime
    # Number of the first chunk carried here (a large document spans several events).
    first: int = 0
    # Chunks of the whole document (all its events together).
    total: int = 0
    pages: int = 0
    size: int = 0


class DocumentRemoved(
    msgspec.Struct, frozen=True, kw_only=True, tag="kb.document_removed", tag_field="type"
):
    collection: str
    path: str
    sha256: str
    at: datetime


KbEvent = DocumentAdded | DocumentRemoved

CODEC: Codec[KbEvent] = Codec(KbEvent)


def chunk_id(collection: str, sha256: str, number: int) -> str:
    """A chunk's id: the same content in one collection is indexed once."""
    return f"{collection}:{sha256[:16]}:{number}"


def documents(events: Iterable[KbEvent]) -> dict[str, str]:
    """The collection's documents after `events`, path -> sha256 (a pure fold)."""
    state: dict[str, str] = {}
    for event in events:
        match event:
            case DocumentAdded():
                state[event.path] = event.sha256
            case DocumentRemoved():
                if state.get(event.path) == event.sha256:
                    del state[event.path]
            case _:
                assert_never(event)
    return state
