"""Knowledge collections: search for a turn or a tool (`knowledge.search`), and the admin
endpoints' requests (`knowledge.admin`)."""

from __future__ import annotations

from typing import Any

import msgspec

from bus.codec import Codec
from eventstore.knowledge import Position

__all__ = [
    "ADMIN_CODEC",
    "ADMIN_REPLY_CODEC",
    "SEARCH_CODEC",
    "SEARCH_REPLY_CODEC",
    "AdminReply",
    "AdminRequest",
    "KnowledgeFound",
    "KnowledgeHit",
    "KnowledgeSearch",
]


class KnowledgeHit(msgspec.Struct, frozen=True, kw_only=True):
    """A retrieved chunk. `score`: fused rank score (hybrid) or BM25 (keyword only);
    `similarity`: cosine of chunk and query, what `threshold` applies to."""

    collection: str
    path: str
    sha256: str
    chunk: int
    heading: tuple[str, ...]
    position: Position
    text: str
    score: float
    similarity: float
    vector_rank: int | None = None
    keyword_rank: int | None = None


class KnowledgeSearch(msgspec.Struct, frozen=True, kw_only=True):
    collections: list[str]
    query: str
    k: int = 5
    threshold: float | None = None


class KnowledgeFound(msgspec.Struct, frozen=True, kw_only=True):
    hits: list[KnowledgeHit]


class AdminRequest(msgspec.Struct, frozen=True, kw_only=True):
    """list | documents | add | remove, for the admin HTTP endpoints."""

    action: str
    collection: str | None = None
    # add: an uploaded file (name and bytes); remove: the document path as listed.
    filename: str | None = None
    data: bytes | None = None
    path: str | None = None


class AdminReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True
    error: str | None = None
    status: int = 200
    result: Any = None


SEARCH_CODEC: Codec[KnowledgeSearch] = Codec(KnowledgeSearch)
SEARCH_REPLY_CODEC: Codec[KnowledgeFound] = Codec(KnowledgeFound)
ADMIN_CODEC: Codec[AdminRequest] = Codec(AdminRequest)
ADMIN_REPLY_CODEC: Codec[AdminReply] = Codec(AdminReply)
