"""The knowledge index: a projection of KB_EVENTS, rebuilt from the log at will.

Chunks live in a `HybridIndex` (SQLite + sqlite-vec + FTS5, hybrid search, see
`actors.search.hybrid`), one scope per collection, `collection_scope(name)` =
`Scope("c", "", name)`: no tenant and no session stand in for a collection, and
no memory search reads a scope of that kind. A chunk is an entry of kind "chunk",
role "document", with no source; the indexed text is the heading path then the
chunk. What the hybrid index does not hold sits in three tables of our own in the
same file: `knowledge_docs` (collection, path -> sha256 and sizes),
`knowledge_chunks` (chunk id -> sha256, number, position, heading) and
`knowledge_checkpoints` (collection -> last applied seq).

Chunks are keyed by content (`chunk_id(collection, sha256, n)`): two paths with
the same bytes share one set of chunks, which are deleted when the last of those
paths leaves. Applying is idempotent: a replayed event changes nothing.

Rebuilds. The index is a projection: when the hybrid index empties itself on
open (another embedding model, or a file of an older layout such as the one that
kept chunks under a reserved tenant), our tables go too, and each collection is
indexed again from the log on its next sync.

Order. Every search and admin call syncs its collection, and applying an addition
waits on the embedder, so callers overlap. A collection's events are applied by
one caller at a time, in log order, and never behind the collection's checkpoint
(a caller that read the log earlier would otherwise add back a document removed
since): a removal cannot land while the chunks it removes are being embedded, to
be stored after it. A rebuild waits for every collection and holds them all.
Statements of overlapping callers share one connection, so each group of writes
is one transaction under a lock, never held across an embedding.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

import aiosqlite
import msgspec
import numpy as np
import numpy.typing as npt
import structlog

from actors.knowledge.log import KnowledgeLog
from actors.search.connection import Transaction, connect
from actors.search.hybrid import Entry, Hit, HybridIndex, Scope
from contracts.knowledge import KnowledgeHit
from eventstore.knowledge import DocumentAdded, DocumentRemoved, KbEvent, Position, chunk_id

__all__ = [
    "CollectionInfo",
    "DocumentInfo",
    "KnowledgeIndex",
    "collection_scope",
    "indexed_text",
]

log = structlog.get_logger("veil.knowledge")

#: The kind of scope that holds a collection's chunks.
SCOPE_KIND = "c"


class Embedder(Protocol):
    dim: int
    model_id: str

    async def aembed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]: ...


class DocumentInfo(msgspec.Struct, frozen=True, kw_only=True):
    collection: str
    path: str
    sha256: str
    chunks: int
    pages: int
    size: int
    added_at: datetime


class CollectionInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    documents: int
    chunks: int


def collection_scope(name: str) -> Scope:
    """The hybrid index scope of a collection's chunks (collections have no tenant)."""
    return Scope(SCOPE_KIND, "", name)


def indexed_text(heading: Sequence[str], text: str) -> str:
    """What is embedded and indexed for a chunk: its heading path, then the chunk."""
    return f"{' › '.join(heading)}\n\n{text}" if heading else text


_SCHEMA = """
CREATE TABLE IF NOT EXISTS knowledge_docs (
    collection TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL, chunks INTEGER NOT NULL,
    pages INTEGER NOT NULL, size INTEGER NOT NULL, added_at TEXT NOT NULL,
    PRIMARY KEY (collection, path));
CREATE INDEX IF NOT EXISTS knowledge_docs_by_sha ON knowledge_docs (collection, sha256);
CREATE TABLE IF NOT EXISTS knowledge_chunks (
    id TEXT PRIMARY KEY, collection TEXT NOT NULL, sha256 TEXT NOT NULL, number INTEGER NOT NULL,
    offset INTEGER NOT NULL, page INTEGER, heading TEXT NOT NULL, indexed INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS knowledge_chunks_by_doc ON knowledge_chunks (collection, sha256);
CREATE TABLE IF NOT EXISTS knowledge_checkpoints (collection TEXT PRIMARY KEY, seq INTEGER NOT NULL);
"""
_DROP = ("knowledge_docs", "knowledge_chunks", "knowledge_checkpoints")


class _Gate:
    """One holder per collection at a time, or one holder of every collection (a rebuild)."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._holders = 0
        self._idle = asyncio.Event()  # no collection is held
        self._idle.set()
        self._open = asyncio.Event()  # no rebuild holds or waits
        self._open.set()
        self._rebuild = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def collection(self, name: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(name, asyncio.Lock())
        if not self._open.is_set() or lock.locked():
            # A search that waits for an ingestion of its collection is slow for a reason.
            log.info("knowledge.waiting", collection=name)
        while not self._open.is_set():
            await self._open.wait()
        self._holders += 1
        self._idle.clear()
        try:
            async with lock:
                yield
        finally:
            self._holders -= 1
            if self._holders == 0:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def everything(self) -> AsyncIterator[None]:
        if self._holders or self._rebuild.locked():
            log.info("knowledge.waiting", rebuild=True)
        async with self._rebuild:
            # Closed first, so that no new holder starts while the current ones finish.
            self._open.clear()
            try:
                await self._idle.wait()
                yield
            finally:
                self._open.set()


class KnowledgeIndex:
    """Hybrid retrieval over collections of documents."""

    def __init__(self, hybrid: HybridIndex, db: aiosqlite.Connection, embedder: Embedder) -> None:
        self.hybrid = hybrid
        self.embedder = embedder
        self._db = db
        self._gate = _Gate()
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path, *, embedder: Embedder | None = None) -> KnowledgeIndex:
        """Open (creating if needed) the index file, e.g. `$VEIL_DATA_DIR/knowledge.sqlite`."""
        if embedder is None:
            from actors.memory.embedder import default_embedder

            embedder = default_embedder()
        hybrid = await HybridIndex.open(path, dim=embedder.dim, model=embedder.model_id)
        try:
            # Our own writer on the same file (WAL); HybridIndex keeps its connections private.
            db = await connect(str(path), reader=False)
            if hybrid.emptied:
                # Chunks were embedded by another model, or stored in an older layout:
                # each collection is indexed again from the log on its next sync
                # (search, listing, ingestion).
                await _drop_tables(db)
            await db.executescript(_SCHEMA)
        except BaseException:
            await hybrid.close()
            raise
        return cls(hybrid, db, embedder)

    async def close(self) -> None:
        await self._db.close()
        await self.hybrid.close()

    async def scrub(self) -> None:
        """Rewrite the file so that no byte of a removed chunk survives anywhere in it."""
        await self.hybrid.scrub()

    # -- applying events --------------------------------------------------

    async def checkpoint(self, collection: str) -> int:
        """Seq of the collection's last applied event (0 when none)."""
        rows = list(
            await self._db.execute_fetchall(
                "SELECT seq FROM knowledge_checkpoints WHERE collection = ?", (collection,)
            )
        )
        return int(rows[0][0]) if rows else 0

    async def apply(self, events: Sequence[tuple[int, KbEvent]]) -> None:
        """Apply (seq, event) pairs in order; events already applied change nothing."""
        for collection, run in itertools.groupby(events, key=lambda item: item[1].collection):
            async with self._gate.collection(collection):
                await self._apply(collection, list(run))

    async def sync(self, log: KnowledgeLog, collection: str) -> int:
        """Apply the collection's events the index has not seen yet; returns how many."""
        async with self._gate.collection(collection):
            events = await log.read(collection, after=await self.checkpoint(collection))
            await self._apply(collection, events)
        return len(events)

    async def rebuild(self, log: KnowledgeLog) -> int:
        """Drop everything and apply the whole log again; returns the events applied."""
        async with self._gate.everything():
            await self.hybrid.reset()
            async with self._write_lock:
                await _drop_tables(self._db)
                await self._db.executescript(_SCHEMA)
            events = await log.read()
            for collection, run in itertools.groupby(events, key=lambda item: item[1].collection):
                await self._apply(collection, list(run))
        return len(events)

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._write_lock, Transaction(self._db) as db:
            yield db

    async def _apply(self, collection: str, events: Sequence[tuple[int, KbEvent]]) -> None:
        """`apply` for one collection's events, its gate held."""
        # The last applied event again changes nothing; an older one would undo what
        # followed it (a stale reader's copy).
        applied = await self.checkpoint(collection)
        for seq, event in events:
            if seq < applied:
                continue
            if isinstance(event, DocumentAdded):
                await self._add(seq, event)
            else:
                await self._remove(event)
            async with self._write() as db:
                await db.execute(
                    "INSERT INTO knowledge_checkpoints (collection, seq) VALUES (?, ?)"
                    " ON CONFLICT (collection) DO UPDATE SET seq = max(seq, excluded.seq)",
                    (collection, seq),
                )

    async def _add(self, seq: int, event: DocumentAdded) -> None:
        c = event.collection
        rows = list(
            await self._db.execute_fetchall(
                "SELECT sha256 FROM knowledge_docs WHERE collection = ? AND path = ?",
                (c, event.path),
            )
        )
        if rows and rows[0][0] != event.sha256:
            # A new version without a removal of the old one: the old one goes now.
            await self._remove(
                DocumentRemoved(collection=c, path=event.path, sha256=str(rows[0][0]), at=event.at)
            )
        async with self._write() as db:
            await db.execute(
                "INSERT INTO knowledge_docs (collection, path, sha256, chunks, pages, size, added_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (collection, path) DO UPDATE SET"
                " chunks = excluded.chunks, pages = excluded.pages, size = excluded.size",
                (
                    c,
                    event.path,
                    event.sha256,
                    event.total or len(event.chunks),
                    event.pages,
                    event.size,
                    event.at.isoformat(),
                ),
            )
            await db.executemany(
                "INSERT INTO knowledge_chunks (id, collection, sha256, number, offset, page, heading)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                [
                    (
                        chunk_id(c, event.sha256, event.first + i),
                        c,
                        event.sha256,
                        event.first + i,
                        ch.position.offset,
                        ch.position.page,
                        json.dumps(ch.heading),
                    )
                    for i, ch in enumerate(event.chunks)
                ],
            )
        ids = [chunk_id(c, event.sha256, event.first + i) for i in range(len(event.chunks))]
        pending = await self._not_indexed(ids)
        if not pending:
            return
        todo = [(i, ch) for i, ch in enumerate(event.chunks) if ids[i] in pending]
        texts = [indexed_text(ch.heading, ch.text) for _, ch in todo]
        vectors = await self.embedder.aembed(texts)
        entries = [
            Entry(
                scope=collection_scope(c),
                id=ids[i],
                kind="chunk",
                role="document",
                text=text,
                source=None,
                source_seq=seq,
                created_at=event.at,
            )
            for (i, _), text in zip(todo, texts, strict=True)
        ]
        await self.hybrid.add(entries, vectors)
        async with self._write() as db:
            await db.executemany(
                "UPDATE knowledge_chunks SET indexed = 1 WHERE id = ?", [(ids[i],) for i, _ in todo]
            )

    async def _not_indexed(self, ids: list[str]) -> set[str]:
        out: set[str] = set()
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            rows = await self._db.execute_fetchall(
                f"SELECT id FROM knowledge_chunks WHERE indexed = 0 AND id IN ({','.join('?' * len(part))})",
                part,
            )
            out.update(str(r[0]) for r in rows)
        return out

    async def _remove(self, event: DocumentRemoved) -> None:
        c = event.collection
        async with self._write() as db:
            await db.execute(
                "DELETE FROM knowledge_docs WHERE collection = ? AND path = ? AND sha256 = ?",
                (c, event.path, event.sha256),
            )
            shared = list(
                await db.execute_fetchall(
                    "SELECT 1 FROM knowledge_docs WHERE collection = ? AND sha256 = ? LIMIT 1",
                    (c, event.sha256),
                )
            )
        # Even when the document was gone already: a removal cut short before its
        # chunks went is finished when it is applied again.
        if shared:
            return
        ids = [
            str(r[0])
            for r in await self._db.execute_fetchall(
                "SELECT id FROM knowledge_chunks WHERE collection = ? AND sha256 = ?",
                (c, event.sha256),
            )
        ]
        if not ids:
            return
        scope = collection_scope(c)
        await self.hybrid.delete_ids(scope.space, (scope.kind,), ids, scrub=False)
        async with self._write() as db:
            await db.execute(
                "DELETE FROM knowledge_chunks WHERE collection = ? AND sha256 = ?",
                (c, event.sha256),
            )

    # -- reading ----------------------------------------------------------

    async def search(
        self,
        collections: str | Sequence[str],
        query: str,
        *,
        k: int = 5,
        threshold: float | None = None,
        keyword_only: bool = False,
    ) -> list[KnowledgeHit]:
        """Best chunks for `query` across collections; with `threshold`, only those whose
        cosine similarity to the query reaches it."""
        names = [collections] if isinstance(collections, str) else list(collections)
        vector = (await self.embedder.aembed([query]))[0]
        found: list[Hit] = []
        for name in names:
            scope = collection_scope(name)
            if keyword_only:
                found += await self.hybrid.keyword_search([scope], query_text=query, k=k)
            else:
                found += await self.hybrid.search(
                    [scope], query_vector=vector, query_text=query, k=k
                )
        found.sort(key=lambda h: -h.score)
        sims = await self._similarities(vector, found)
        out: list[KnowledgeHit] = []
        for h in found:
            sim = sims[h.scope, h.id]
            if threshold is not None and sim < threshold:
                continue
            hit = await self._hit(h.scope.owner, h, sim)
            if hit is not None:
                out.append(hit)
            if len(out) == k:
                break
        return out

    async def _similarities(
        self, vector: npt.NDArray[np.float32], hits: list[Hit]
    ) -> dict[tuple[Scope, str], float]:
        """Each hit's cosine to the query, -1 for one gone since the search found it."""
        sims = {(h.scope, h.id): h.vector_similarity for h in hits}
        missing: dict[Scope, list[str]] = {}
        for h in hits:
            if h.vector_similarity is None:
                missing.setdefault(h.scope, []).append(h.id)
        # Keyword-only finds have no cosine from the search: read their stored vectors.
        for scope, ids in missing.items():
            stored = await self.hybrid.similarities(scope, ids, vector)
            sims.update(((scope, i), stored.get(i)) for i in ids)
        return {key: -1.0 if sim is None else float(sim) for key, sim in sims.items()}

    async def _hit(self, collection: str, h: Hit, similarity: float) -> KnowledgeHit | None:
        rows = list(
            await self._db.execute_fetchall(
                "SELECT c.sha256, c.number, c.offset, c.page, c.heading, min(d.path)"
                " FROM knowledge_chunks c JOIN knowledge_docs d"
                " ON d.collection = c.collection AND d.sha256 = c.sha256 WHERE c.id = ?",
                (h.id,),
            )
        )
        if not rows or rows[0][0] is None:
            return None  # removed since the search read it
        sha, number, offset, page, heading_json, path = rows[0]
        heading = tuple(json.loads(heading_json))
        prefix = len(indexed_text(heading, "")) if heading else 0
        return KnowledgeHit(
            collection=collection,
            path=str(path),
            sha256=str(sha),
            chunk=int(number),
            heading=heading,
            position=Position(offset=int(offset), page=page),
            text=h.text[prefix:],
            score=float(h.score),
            similarity=similarity,
            vector_rank=h.vector_rank,
            keyword_rank=h.keyword_rank,
        )

    async def documents(self, collection: str) -> list[DocumentInfo]:
        """The collection's documents, by path."""
        rows = await self._db.execute_fetchall(
            "SELECT path, sha256, chunks, pages, size, added_at FROM knowledge_docs"
            " WHERE collection = ? ORDER BY path",
            (collection,),
        )
        return [
            DocumentInfo(
                collection=collection,
                path=str(r[0]),
                sha256=str(r[1]),
                chunks=int(r[2]),
                pages=int(r[3]),
                size=int(r[4]),
                added_at=datetime.fromisoformat(r[5]),
            )
            for r in rows
        ]

    async def collections(self) -> list[CollectionInfo]:
        """Collections with at least one document, by name."""
        rows = await self._db.execute_fetchall(
            "SELECT d.collection, count(*), (SELECT count(*) FROM knowledge_chunks c"
            " WHERE c.collection = d.collection) FROM knowledge_docs d GROUP BY d.collection"
            " ORDER BY d.collection"
        )
        return [CollectionInfo(name=str(r[0]), documents=int(r[1]), chunks=int(r[2])) for r in rows]


async def _drop_tables(db: aiosqlite.Connection) -> None:
    for table in _DROP:
        await db.execute(f"DROP TABLE IF EXISTS {table}")
