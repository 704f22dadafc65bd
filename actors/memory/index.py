"""The memory index: a projection of the event log, stored in a `HybridIndex`.

The search itself (vectors, keywords, fusion, layout, deletion and scrubbing,
model changes) is `actors.search.hybrid`'s; this maps memory onto its scopes.

Partitions. Every record lives in exactly one scope: the user's when the record
names a user, `Scope("u", tenant, user)`, else the session's, `Scope("s", tenant,
session)`. A search of (tenant, session, user) reads at most those two scopes,
so it sees the session's anonymous memories and every memory of that user in
that tenant, and nothing of another tenant or another user (nor any knowledge
chunk: those live in scopes of their own kind, in another file). A memory that
names a user is that user's: a search must name the same user to see it, even
from its own session (the session actor passes the user it pinned at the
session's start). A record's id is unique within its scope; its session is the
entry's `source`.

Forgetting. A deleted session stays deleted: `delete_session` erases the
session's records from both kinds of scope of the tenant and records the session
as a deleted source, in one transaction; `add` drops every record of a recorded
session inside its own transaction, so a deletion that lands while the
projection embeds a batch still wins. `reset` keeps the record, so a rebuild
from the log never brings a deleted session back either.

Model. Opened with another embedding model, or on a file of an older layout,
the index empties itself (`model_changed`, `emptied`) and its owner follows the
log again from its start (the checkpoint is gone with the records). The shape of
the items (`ITEMS`: what the projection makes of the log) counts as part of the
model: vectors of other items do not mix with these, so changing it rebuilds too.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy.typing as npt

from actors.memory.query import COMMON_LEAST, COMMON_SHARE, without_words
from actors.search.hybrid import (
    KEYWORD_TERM_CAP,
    PROMOTE_AT,
    RRF_K,
    VECTOR_CANDIDATES,
    Entry,
    Hit,
    HybridIndex,
    Scope,
    fts_terms,
    quantize,
)
from actors.search.hybrid import HybridIndexError as MemoryIndexError
from contracts.memory import MemoryHit

__all__ = [
    "FUSED_HEAD",
    "ITEMS",
    "KEYWORD_TERM_CAP",
    "KEYWORD_WEIGHT",
    "PROMOTE_AT",
    "RRF_K",
    "SCOPE_KINDS",
    "VECTOR_CANDIDATES",
    "MemoryIndex",
    "MemoryIndexError",
    "MemoryRecord",
    "fts_terms",
    "indexed_model",
    "quantize",
]

#: The kinds of scope memory keeps: a session's, a user's.
SCOPE_KINDS = ("s", "u")

#: Keyword weight in memory's fusion (the vector side weighs 1), and the candidates of
#: each side fused. With a turn as one item (issue 15), keywords confirm more than they
#: discover again: recall@5/@10, head 10 kw 1.0 -> head 20 kw 0.5, long real talk
#: (bench/long_memory_eval.py --sweep) 0.60/0.76 -> 0.63/0.80, the hand-written set
#: (bench/memory_eval.py --fusion) 0.876/0.956 -> 0.876/0.964. Heads of 40 and more let
#: shared common words win (0.59 at 40).
KEYWORD_WEIGHT = 0.5
FUSED_HEAD = 20

#: The items the projection makes (`actors.memory.projector`): a turn and its reply as one.
ITEMS = "exchange-1"


def indexed_model(model: str) -> str:
    """What the index records as its model: the embedder's id and the shape of the items."""
    return f"{model}; items {ITEMS}"


class MemoryRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One memory: a message, a fact or a summary, with its place in the log."""

    id: str
    tenant: str
    user_id: str | None
    session_id: str
    kind: str  # "exchange" (a turn: its messages and reply) | "fact"
    role: str
    text: str
    source_seq: int
    created_at: datetime


def _scopes(tenant: str, session_id: str, user_id: str | None) -> list[Scope]:
    """What a search of (tenant, session, user) reads: the session's scope and the user's."""
    scopes = [Scope("s", tenant, session_id)]
    if user_id is not None:
        scopes.append(Scope("u", tenant, user_id))
    return scopes


def _entry(r: MemoryRecord) -> Entry:
    scope = (
        Scope("u", r.tenant, r.user_id)
        if r.user_id is not None
        else Scope("s", r.tenant, r.session_id)
    )
    return Entry(
        scope=scope,
        id=r.id,
        kind=r.kind,
        role=r.role,
        text=r.text,
        source=r.session_id,
        source_seq=r.source_seq,
        created_at=r.created_at,
    )


def _hit(h: Hit) -> MemoryHit:
    return MemoryHit(
        id=h.id,
        session_id=h.source or "",
        user_id=h.scope.owner if h.scope.kind == "u" else None,
        kind=h.kind,
        role=h.role,
        text=h.text,
        source_seq=h.source_seq,
        created_at=h.created_at,
        score=h.score,
        vector_rank=h.vector_rank,
        vector_similarity=h.vector_similarity,
        keyword_rank=h.keyword_rank,
        bm25=h.bm25,
    )


class MemoryIndex:
    """Hybrid (vector + BM25) recall over memories, partitioned by tenant and owner."""

    def __init__(self, store: HybridIndex) -> None:
        self.store = store

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def model_changed(self) -> bool:
        """True when `open` emptied the index because its vectors came from another model."""
        return self.store.model_changed

    @property
    def emptied(self) -> bool:
        """True when `open` emptied the index (another model, an older layout)."""
        return self.store.emptied

    @classmethod
    async def open(
        cls, path: str | Path, *, dim: int = 384, model: str | None = None
    ) -> MemoryIndex:
        """Open (creating if needed) the index file at `path`.

        With `model` (an embedder's `model_id`), an index built by another model, or
        by one it does not know, is emptied for a rebuild; `model_changed` says so.
        """
        stored = None if model is None else indexed_model(model)
        return cls(await HybridIndex.open(path, dim=dim, model=stored))

    async def close(self) -> None:
        """Close every connection."""
        await self.store.close()

    # -- writing ----------------------------------------------------------

    async def add(
        self,
        records: Sequence[MemoryRecord],
        vectors: npt.ArrayLike,
        *,
        checkpoint: int | None = None,
    ) -> None:
        """Store records not stored yet (by scope and id) and the log position, atomically.

        Records of a session deleted with `delete_session` are left out, whenever it was.
        """
        await self.store.add([_entry(r) for r in records], vectors, checkpoint=checkpoint)

    async def delete_session(self, tenant: str, session_id: str, *, scrub: bool = True) -> int:
        """Erase every memory of a session, from every table and from the file; returns how many.

        With `scrub=False` the rows are gone from every table at once, but stale copies may
        stay in the file until `scrub()` runs.
        """
        return await self.store.delete_source(tenant, SCOPE_KINDS, session_id, scrub=scrub)

    async def delete_ids(self, tenant: str, ids: Collection[str], *, scrub: bool = True) -> int:
        """Erase the tenant's memories with these ids; returns how many existed."""
        return await self.store.delete_ids(tenant, SCOPE_KINDS, ids, scrub=scrub)

    async def scrub(self) -> None:
        """Rewrite the file so that no byte of a deleted memory survives anywhere in it."""
        await self.store.scrub()

    async def reset(self) -> None:
        """Drop every memory and the checkpoint (for a rebuild from the log); keeps the model
        and the deleted sessions."""
        await self.store.reset()

    # -- reading ----------------------------------------------------------

    async def checkpoint(self) -> int:
        """The last log position stored with `add` (0 when none)."""
        return await self.store.checkpoint()

    async def count(self) -> int:
        """How many memories are stored."""
        return await self.store.count()

    async def forgotten(self, sessions: Collection[tuple[str, str]]) -> set[tuple[str, str]]:
        """Those of these (tenant, session id) that `delete_session` erased."""
        return await self.store.forgotten(sessions)

    async def search(
        self,
        *,
        tenant: str,
        session_id: str,
        user_id: str | None,
        query_vector: npt.ArrayLike,
        query_text: str,
        k: int = 10,
        kinds: Collection[str] | None = None,
    ) -> list[MemoryHit]:
        """Hybrid recall: vector and keyword candidates fused by reciprocal rank. The
        keyword side leaves out the words half the searched memories hold, as
        `semantic_query` leaves them out of what is embedded (`actors.memory.query`)."""
        hits = await self.store.search(
            _scopes(tenant, session_id, user_id),
            query_vector=query_vector,
            query_text=query_text,
            k=k,
            kinds=kinds,
            head=FUSED_HEAD,
            keyword_weight=KEYWORD_WEIGHT,
            common=(COMMON_SHARE, COMMON_LEAST),
        )
        return [_hit(h) for h in hits]

    async def semantic_query(
        self, *, tenant: str, session_id: str, user_id: str | None, query_text: str
    ) -> str:
        """What recall embeds of `query_text`: the query less the words that half or more
        of the memories it searches hold (`actors.memory.query`), such as the names of
        a transcript's speakers, which begin every item."""
        common = await self.store.common_terms(
            _scopes(tenant, session_id, user_id),
            query_text,
            share=COMMON_SHARE,
            least=COMMON_LEAST,
        )
        return without_words(query_text, common)

    async def vector_search(
        self,
        *,
        tenant: str,
        session_id: str,
        user_id: str | None,
        query_vector: npt.ArrayLike,
        k: int = 10,
        kinds: Collection[str] | None = None,
    ) -> list[MemoryHit]:
        """Vector-only recall (score: cosine similarity), for comparison."""
        hits = await self.store.vector_search(
            _scopes(tenant, session_id, user_id), query_vector=query_vector, k=k, kinds=kinds
        )
        return [_hit(h) for h in hits]

    async def keyword_search(
        self,
        *,
        tenant: str,
        session_id: str,
        user_id: str | None,
        query_text: str,
        k: int = 10,
        kinds: Collection[str] | None = None,
    ) -> list[MemoryHit]:
        """Keyword-only recall (score: BM25; common words left out as `search` does)."""
        hits = await self.store.keyword_search(
            _scopes(tenant, session_id, user_id),
            query_text=query_text,
            k=k,
            kinds=kinds,
            common=(COMMON_SHARE, COMMON_LEAST),
        )
        return [_hit(h) for h in hits]

    async def dump(self) -> list[tuple[Any, ...]]:
        """Every memory as a canonical tuple (no rowids or insertion order), sorted: tenant,
        id, user, session, kind, role, text, source_seq, created_at, scope kind, scope
        owner, the vector's sha256, the sign bits in hex."""
        out = [
            (space, id_, owner if scope == "u" else None, source, *rest, scope, owner, sha, bits)
            for scope, space, owner, id_, source, *rest, sha, bits in await self.store.dump()
        ]
        return sorted(out, key=repr)

    async def verify(self) -> None:
        """Raise MemoryIndexError unless records, vectors, vec0 and FTS5 agree."""
        await self.store.verify()
