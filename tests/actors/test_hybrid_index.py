"""Memory and knowledge on one hybrid index: scopes of their own kinds, never each other's.

Each runs in its own file in production; here both open the same file, so that a
record of one reaching a search or a deletion of the other would show.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import msgspec
import numpy as np
import pysqlite3.dbapi2 as sqlite  # type: ignore[import-untyped]
import pytest
import sqlite_vec  # type: ignore[import-untyped]

from actors.knowledge import KnowledgeIndex
from actors.knowledge.index import collection_scope
from actors.knowledge.log import KnowledgeLog
from actors.memory.embedder import Embedder, default_embedder
from actors.memory.index import MemoryIndex, MemoryRecord, indexed_model
from actors.search.connection import CACHE_KIB, connect
from actors.search.hybrid import Entry, HybridIndex, Scope
from eventstore.knowledge import (
    ChunkData,
    DocumentAdded,
    DocumentRemoved,
    KbEvent,
    Position,
    chunk_id,
)

AT = datetime(2026, 5, 1, tzinfo=UTC)
WORD = "quokkavault"
COLLECTION = "handbook"
# The tenant the knowledge index used to keep its chunks under, the space it keeps
# them in now, and an ordinary one.
TENANTS = ("__kb__", "", "acme")


def handbook() -> DocumentAdded:
    return DocumentAdded(
        collection=COLLECTION,
        path="/docs/handbook.md",
        sha256="a" * 64,
        chunks=(ChunkData(text=f"The vault code is {WORD}.", position=Position(offset=0)),),
        at=AT,
        total=1,
    )


CHUNK = chunk_id(COLLECTION, "a" * 64, 0)


def memory_of(tenant: str, user: str | None) -> MemoryRecord:
    return MemoryRecord(
        id=f"{tenant}:{user}:m",
        tenant=tenant,
        user_id=user,
        session_id=COLLECTION,  # a session named like the collection
        kind="message",
        role="user",
        text=f"My own vault code is {WORD} as well.",
        source_seq=1,
        created_at=AT,
    )


class ListLog:
    def __init__(self, *events: KbEvent) -> None:
        self.events = list(events)

    async def read(
        self, collection: str | None = None, *, after: int = 0
    ) -> list[tuple[int, KbEvent]]:
        return [
            (seq, e)
            for seq, e in enumerate(self.events, 1)
            if seq > after and collection in (None, e.collection)
        ]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return default_embedder()


@pytest.fixture
async def both(
    tmp_path: Path, embedder: Embedder
) -> AsyncIterator[tuple[KnowledgeIndex, MemoryIndex]]:
    path = tmp_path / "shared.sqlite"
    kb = await KnowledgeIndex.open(path, embedder=embedder)
    memory = await MemoryIndex.open(path, model=embedder.model_id)
    try:
        yield kb, memory
    finally:
        await memory.close()
        await kb.close()


async def memory_ids(
    memory: MemoryIndex, embedder: Embedder, tenant: str, user: str | None
) -> set[str]:
    vector = embedder.embed([WORD])[0]
    found: set[str] = set()
    for hits in (
        await memory.search(
            tenant=tenant,
            session_id=COLLECTION,
            user_id=user,
            query_vector=vector,
            query_text=WORD,
            k=50,
        ),
        await memory.vector_search(
            tenant=tenant, session_id=COLLECTION, user_id=user, query_vector=vector, k=50
        ),
        await memory.keyword_search(
            tenant=tenant, session_id=COLLECTION, user_id=user, query_text=WORD, k=50
        ),
    ):
        found |= {h.id for h in hits}
    return found


async def chunk_ids(kb: KnowledgeIndex, embedder: Embedder) -> set[str]:
    """Every entry a search of the collection's scope finds, chunk of a document or not."""
    scope = [collection_scope(COLLECTION)]
    vector = embedder.embed([WORD])[0]
    found = {h.id for h in await kb.hybrid.keyword_search(scope, query_text=WORD, k=50)}
    return found | {h.id for h in await kb.hybrid.vector_search(scope, query_vector=vector, k=50)}


async def test_knowledge_chunks_are_in_no_memory_scope_and_memories_in_no_collection(
    both: tuple[KnowledgeIndex, MemoryIndex], embedder: Embedder
) -> None:
    kb, memory = both
    await kb.apply([(1, handbook())])
    records = [memory_of(t, u) for t in TENANTS for u in (None, COLLECTION)]
    await memory.add(records, embedder.embed([r.text for r in records]))
    assert await memory.count() == len(records) + 1  # one file, both kinds of entry

    for tenant in TENANTS:
        for user in (None, COLLECTION):
            seen = {f"{tenant}:None:m"} | ({f"{tenant}:{user}:m"} if user else set())
            assert await memory_ids(memory, embedder, tenant, user) == seen, (tenant, user)
    assert await chunk_ids(kb, embedder) == {CHUNK}
    hits = await kb.search(COLLECTION, WORD, k=10)
    assert [h.chunk for h in hits] == [0] and WORD in hits[0].text

    # Memory's deletions reach no chunk, and do not keep the collection from being indexed.
    for tenant in TENANTS:
        assert await memory.delete_session(tenant, COLLECTION, scrub=False) == 2
        assert await memory.delete_ids(tenant, [CHUNK], scrub=False) == 0
    assert await memory.count() == 1
    assert await chunk_ids(kb, embedder) == {CHUNK}
    await memory.add(records, embedder.embed([r.text for r in records]))  # sessions forgotten
    assert await memory.count() == 1
    log = ListLog(handbook())
    await kb.rebuild(cast(KnowledgeLog, log))
    assert [h.chunk for h in await kb.search(COLLECTION, WORD, k=10)] == [0]

    # A collection's removal reaches no memory, not even one with the chunk's id.
    twins = [
        msgspec.structs.replace(memory_of(t, None), id=CHUNK, session_id="s2") for t in TENANTS
    ]
    await memory.add(twins, embedder.embed([r.text for r in twins]))
    log.events.append(
        DocumentRemoved(collection=COLLECTION, path=handbook().path, sha256="a" * 64, at=AT)
    )
    await kb.sync(cast(KnowledgeLog, log), COLLECTION)
    assert await kb.search(COLLECTION, WORD, k=10) == [] and await chunk_ids(kb, embedder) == set()
    for tenant in TENANTS:
        twin = await memory.keyword_search(
            tenant=tenant, session_id="s2", user_id=None, query_text=WORD
        )
        assert [h.id for h in twin] == [CHUNK], tenant


async def test_scopes_of_one_owner_name_and_other_kinds_are_apart(tmp_path: Path) -> None:
    index = await HybridIndex.open(tmp_path / "h.sqlite", dim=8)
    try:
        scopes = [Scope(k, s, "x") for k in ("s", "u", "c") for s in ("", "t")]
        entries = [
            Entry(
                scope=scope,
                id="same-id",
                kind="message",
                role="user",
                text=f"word {scope.kind}{scope.space}",
                source=None,
                source_seq=1,
                created_at=AT,
            )
            for scope in scopes
        ]
        await index.add(entries, np.ones((len(entries), 8), np.float32))
        assert await index.count() == len(scopes)
        for scope in scopes:
            hits = await index.keyword_search([scope], query_text="word")
            assert [h.text for h in hits] == [f"word {scope.kind}{scope.space}"]
            assert [h.scope for h in hits] == [scope]
    finally:
        await index.close()


# -- files of the old layout (format 1) ---------------------------------------

# The tables as the code before format 2 made them, chunks under a reserved tenant.
OLD_SCHEMA = """
CREATE TABLE memory_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE memory_scopes (
    scope INTEGER PRIMARY KEY, kind TEXT NOT NULL, tenant TEXT NOT NULL, owner TEXT NOT NULL,
    next_seq INTEGER NOT NULL DEFAULT 0, tier INTEGER NOT NULL DEFAULT 0,
    UNIQUE (kind, tenant, owner));
CREATE TABLE memories (
    rid INTEGER PRIMARY KEY, tenant TEXT NOT NULL, id TEXT NOT NULL, user_id TEXT,
    session_id TEXT NOT NULL, kind TEXT NOT NULL, role TEXT NOT NULL, text TEXT NOT NULL,
    source_seq INTEGER NOT NULL, created_at TEXT NOT NULL, UNIQUE (tenant, id));
CREATE INDEX memories_by_session ON memories (tenant, session_id);
CREATE TABLE memory_vectors (rid INTEGER PRIMARY KEY, vector BLOB NOT NULL);
CREATE VIRTUAL TABLE memory_fts USING fts5(
    text, content='memories', content_rowid='rid', tokenize='unicode61 remove_diacritics 2');
CREATE TABLE memory_forgotten (key BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE VIRTUAL TABLE memory_vec_small USING vec0(
    scope INTEGER PARTITION KEY, bits BIT[384], chunk_size=32);
CREATE VIRTUAL TABLE memory_vec_large USING vec0(
    scope INTEGER PARTITION KEY, bits BIT[384], chunk_size=1024);
CREATE TABLE knowledge_docs (
    collection TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL, chunks INTEGER NOT NULL,
    pages INTEGER NOT NULL, size INTEGER NOT NULL, added_at TEXT NOT NULL,
    PRIMARY KEY (collection, path));
CREATE TABLE knowledge_chunks (
    id TEXT PRIMARY KEY, collection TEXT NOT NULL, sha256 TEXT NOT NULL, number INTEGER NOT NULL,
    offset INTEGER NOT NULL, page INTEGER, heading TEXT NOT NULL, indexed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE knowledge_checkpoints (collection TEXT PRIMARY KEY, seq INTEGER NOT NULL);
"""


def old_file(path: Path, model: str, tenant: str, session: str, rid: str) -> None:
    """An index file as format 1 left it: one row (and its vector), a checkpoint, a
    deleted session, and the knowledge tables that say the row's chunk is indexed."""
    db = sqlite.connect(path)
    db.enable_load_extension(True)
    sqlite_vec.load(db)
    db.executescript(OLD_SCHEMA)
    vector = np.ones(384, np.float32) / np.sqrt(384)
    with db:
        db.executemany(
            "INSERT INTO memory_meta VALUES (?, ?)",
            [("dim", 384), ("model", model), ("checkpoint", 1)],
        )
        db.execute(
            "INSERT INTO memory_scopes (scope, kind, tenant, owner, next_seq) VALUES (1, 's', ?, ?, 1)",
            (tenant, session),
        )
        db.execute(
            "INSERT INTO memories VALUES (?, ?, ?, NULL, ?, 'chunk', 'document', ?, 1, ?)",
            (1 << 32, tenant, rid, session, f"The vault code is {WORD}.", AT.isoformat()),
        )
        db.execute(
            "INSERT INTO memory_fts (rowid, text) VALUES (?, ?)",
            (1 << 32, f"The vault code is {WORD}."),
        )
        db.execute("INSERT INTO memory_vectors VALUES (?, ?)", (1 << 32, vector.tobytes()))
        db.execute(
            "INSERT INTO knowledge_docs VALUES (?, '/docs/handbook.md', ?, 1, 0, 10, ?)",
            (COLLECTION, "a" * 64, AT.isoformat()),
        )
        db.execute(
            "INSERT INTO knowledge_chunks VALUES (?, ?, ?, 0, 0, NULL, '[]', 1)",
            (rid, COLLECTION, "a" * 64),
        )
        db.execute("INSERT INTO knowledge_checkpoints VALUES (?, 1)", (COLLECTION,))
        db.execute(
            "INSERT INTO memory_forgotten VALUES (?)",
            (hashlib.sha256(b"acme\0gone").digest(),),
        )
    db.close()


async def test_a_knowledge_file_of_the_old_layout_is_rebuilt_from_the_log(
    tmp_path: Path, embedder: Embedder
) -> None:
    path = tmp_path / "knowledge.sqlite"
    old_file(path, embedder.model_id, "__kb__", COLLECTION, CHUNK)
    kb = await KnowledgeIndex.open(path, embedder=embedder)
    try:
        assert kb.hybrid.format_changed and not kb.hybrid.model_changed
        assert await kb.hybrid.count() == 0
        assert await kb.documents(COLLECTION) == [] and await kb.checkpoint(COLLECTION) == 0
        await kb.sync(cast(KnowledgeLog, ListLog(handbook())), COLLECTION)
        assert [h.chunk for h in await kb.search(COLLECTION, WORD, k=5)] == [0]
    finally:
        await kb.close()
    kb = await KnowledgeIndex.open(path, embedder=embedder)
    try:
        assert not kb.hybrid.emptied and await kb.hybrid.count() == 1
    finally:
        await kb.close()


async def test_a_memory_file_of_the_old_layout_is_emptied_and_keeps_its_deletions(
    tmp_path: Path, embedder: Embedder
) -> None:
    path = tmp_path / "memory.sqlite"
    old_file(path, indexed_model(embedder.model_id), "acme", "s1", "s1:1")
    memory = await MemoryIndex.open(path, model=embedder.model_id)
    try:
        assert memory.emptied and not memory.model_changed
        assert (await memory.count(), await memory.checkpoint()) == (0, 0)
        assert await memory.forgotten({("acme", "gone"), ("acme", "s1")}) == {("acme", "gone")}
        gone = msgspec.structs.replace(memory_of("acme", None), session_id="gone")
        await memory.add([gone], embedder.embed([gone.text]))
        assert await memory.count() == 0
        await memory.verify()
    finally:
        await memory.close()


async def test_every_connection_keeps_a_small_page_cache(tmp_path: Path) -> None:
    """An index process holds several connections to files that grow with every turn: a
    large cache each lets it grow by that much times their count."""
    path = str(tmp_path / "index.sqlite")
    for reader in (False, True):
        db = await connect(path, reader=reader)
        try:
            [(size,)] = list(await db.execute_fetchall("PRAGMA cache_size"))
        finally:
            await db.close()
        assert size == -CACHE_KIB
    assert CACHE_KIB <= 4096
