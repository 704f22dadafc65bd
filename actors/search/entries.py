"""What the hybrid index stores and finds: scopes, entries, hits."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import msgspec

__all__ = ["Entry", "Hit", "Scope"]


class Scope(NamedTuple):
    """A partition of the index: what a search reads, whole."""

    kind: str  # what owns it: "s" a session, "u" a user (memory), "c" a collection
    space: str  # where the owner's name is unique: memory's tenant, "" for collections
    owner: str


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """A text to store in a scope, with its place in its owner's log."""

    scope: Scope
    id: str  # unique within the scope
    kind: str  # what searches filter on ("message", "fact", "chunk", ...)
    role: str
    text: str
    source: str | None  # what `delete_source` erases it with (memory: its session)
    source_seq: int
    created_at: datetime


class Hit(msgspec.Struct, frozen=True, kw_only=True):
    """An entry found, with its score and how each side ranked it."""

    scope: Scope
    id: str
    kind: str
    role: str
    text: str
    source: str | None
    source_seq: int
    created_at: datetime
    score: float
    vector_rank: int | None
    vector_similarity: float | None
    keyword_rank: int | None
    bm25: float | None
