"""The memory index's file: connections, schema, transactions, metadata and row layout.

Private to `actors.memory` (and the knowledge index, which shares the file format):
`index.py` holds the records and the search; this holds what SQLite needs.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any, cast

import aiosqlite
import pysqlite3.dbapi2 as sqlite  # type: ignore[import-untyped]
import sqlite_vec  # type: ignore[import-untyped]

__all__ = [
    "DROP",
    "MAX_SCOPE",
    "MAX_SEQ",
    "SCOPE_SHIFT",
    "VEC_TABLES",
    "MemoryIndexError",
    "Transaction",
    "bounds",
    "chunks",
    "connect",
    "create",
    "delete_rows",
    "forgotten_key",
    "get_meta",
    "marks",
    "promote",
    "set_meta",
]


class MemoryIndexError(Exception):
    """The index is inconsistent or could not finish a maintenance step."""


SCOPE_SHIFT = 32
MAX_SEQ = (1 << SCOPE_SHIFT) - 1
MAX_SCOPE = (1 << 31) - 1
CHUNK = 500  # rows per IN (...) list

# vec0 table and chunk size by tier (0 small, 1 large).
VEC_TABLES = (("memory_vec_small", 32), ("memory_vec_large", 1024))


def bounds(scope: int) -> tuple[int, int]:
    return scope << SCOPE_SHIFT, (scope << SCOPE_SHIFT) | MAX_SEQ


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def marks(n: int) -> str:
    return ",".join("?" * n)


def forgotten_key(tenant: str, session_id: str) -> bytes:
    """A deleted session's key in `memory_forgotten`: a digest, since no byte of the
    session, its id included, may stay in the file."""
    return hashlib.sha256(f"{tenant}\0{session_id}".encode()).digest()


async def connect(path: str, *, reader: bool) -> aiosqlite.Connection:
    def connector() -> sqlite3.Connection:
        conn = sqlite.connect(path, isolation_level=None)
        # Extension loading is open only while sqlite-vec loads.
        conn.enable_load_extension(True)
        try:
            sqlite_vec.load(conn)
        finally:
            conn.enable_load_extension(False)
        return cast(sqlite3.Connection, conn)

    db = aiosqlite.Connection(connector, 64)
    # aiosqlite's worker thread is not a daemon: a connection left open (a crash on the
    # way out, a failed test) would keep the process from ever exiting. WAL makes an
    # abrupt end safe for the file.
    db._thread.daemon = True
    await db
    for pragma in (
        "busy_timeout = 10000",
        "secure_delete = ON",
        "temp_store = MEMORY",
        "cache_size = -32768",  # 32 MB: a 100k scope's bits and hot FTS pages
        "synchronous = NORMAL",
    ):
        await db.execute(f"PRAGMA {pragma}")
    if reader:
        await db.execute("PRAGMA query_only = ON")
    return db


SCHEMA = """
CREATE TABLE IF NOT EXISTS memory_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS memory_scopes (
    scope INTEGER PRIMARY KEY, kind TEXT NOT NULL, tenant TEXT NOT NULL, owner TEXT NOT NULL,
    next_seq INTEGER NOT NULL DEFAULT 0, tier INTEGER NOT NULL DEFAULT 0,
    UNIQUE (kind, tenant, owner));
CREATE TABLE IF NOT EXISTS memories (
    rid INTEGER PRIMARY KEY, tenant TEXT NOT NULL, id TEXT NOT NULL, user_id TEXT,
    session_id TEXT NOT NULL, kind TEXT NOT NULL, role TEXT NOT NULL, text TEXT NOT NULL,
    source_seq INTEGER NOT NULL, created_at TEXT NOT NULL, UNIQUE (tenant, id));
CREATE INDEX IF NOT EXISTS memories_by_session ON memories (tenant, session_id);
CREATE TABLE IF NOT EXISTS memory_vectors (rid INTEGER PRIMARY KEY, vector BLOB NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS memory_fts USING fts5(
    text, content='memories', content_rowid='rid', tokenize='unicode61 remove_diacritics 2');
CREATE TABLE IF NOT EXISTS memory_forgotten (key BLOB PRIMARY KEY) WITHOUT ROWID;
"""
# Not memory_forgotten: deleted sessions stay deleted through a rebuild from the log.
DROP = """
DROP TABLE IF EXISTS memory_fts; DROP TABLE IF EXISTS memory_vec_small;
DROP TABLE IF EXISTS memory_vec_large;
DROP TABLE IF EXISTS memory_vectors; DROP TABLE IF EXISTS memories;
DROP TABLE IF EXISTS memory_scopes; DROP TABLE IF EXISTS memory_meta;
"""


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT on the writer, ROLLBACK on any exception."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def __aenter__(self) -> aiosqlite.Connection:
        await self._db.execute("BEGIN IMMEDIATE")
        return self._db

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            await self._db.execute("COMMIT")
            return
        try:
            await self._db.execute("ROLLBACK")
        except sqlite.Error:
            pass  # the failure already ended the transaction


async def create(db: aiosqlite.Connection, dim: int, *, in_transaction: bool = False) -> None:
    statements = [s for s in SCHEMA.split(";") if s.strip()]
    for table, chunk in VEC_TABLES:
        statements.append(
            f"CREATE VIRTUAL TABLE IF NOT EXISTS {table} USING vec0("
            f"scope INTEGER PARTITION KEY, bits BIT[{dim}], chunk_size={chunk})"
        )
        # vec0 (0.1.9) finds a partition's chunks, on every KNN and insert, with
        # `WHERE partition00 = ?` on its chunks table, which it leaves unindexed: without
        # this index each query scans every chunk of every scope (0.6 ms at 1M memories).
        statements.append(
            f"CREATE INDEX IF NOT EXISTS {table}_chunks_by_scope"
            f" ON {table}_chunks (partition00, chunk_id)"
        )
    if not in_transaction:
        await db.execute("BEGIN IMMEDIATE")
    try:
        for sql in statements:
            await db.execute(sql)
        # Persistent FTS5 option: deleted entries are removed from the index, not shadowed.
        await db.execute("INSERT INTO memory_fts (memory_fts, rank) VALUES ('secure-delete', 1)")
        await db.execute(
            "INSERT INTO memory_meta (key, value) VALUES ('dim', ?) ON CONFLICT (key) DO NOTHING",
            (dim,),
        )
        stored = int(await get_meta(db, "dim") or 0)
        if stored != dim:
            raise MemoryIndexError(f"index holds {stored}-dim vectors, not {dim}")
        if not in_transaction:
            await db.execute("COMMIT")
    except BaseException:
        if not in_transaction:
            await db.execute("ROLLBACK")
        raise


async def get_meta(db: aiosqlite.Connection, key: str) -> str | None:
    rows = list(await db.execute_fetchall("SELECT value FROM memory_meta WHERE key = ?", (key,)))
    return str(rows[0][0]) if rows else None


async def set_meta(db: aiosqlite.Connection, key: str, value: str) -> None:
    # The column was declared INTEGER for the checkpoint; SQLite keeps text as text there.
    await db.execute(
        "INSERT INTO memory_meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


async def delete_rows(db: aiosqlite.Connection, rows: list[tuple[int, str]]) -> None:
    """Delete rows (rowid, text) everywhere; drop scopes they leave empty."""
    if not rows:
        return
    # External-content FTS5 must be told the exact text it indexed.
    await db.executemany(
        "INSERT INTO memory_fts (memory_fts, rowid, text) VALUES ('delete', ?, ?)", rows
    )
    rids = [(rid,) for rid, _ in rows]
    scopes = sorted({rid >> SCOPE_SHIFT for rid, _ in rows})
    tier_of: dict[int, int] = {}
    for part in chunks(scopes):
        found = await db.execute_fetchall(
            f"SELECT scope, tier FROM memory_scopes WHERE scope IN ({marks(len(part))})", part
        )
        tier_of.update((int(r[0]), int(r[1])) for r in found)
    for tier, (table, _) in enumerate(VEC_TABLES):
        await db.executemany(
            f"DELETE FROM {table} WHERE rowid = ?",
            [r for r in rids if tier_of[r[0] >> SCOPE_SHIFT] == tier],
        )
    await db.executemany("DELETE FROM memory_vectors WHERE rid = ?", rids)
    await db.executemany("DELETE FROM memories WHERE rid = ?", rids)
    await db.executemany(
        "DELETE FROM memory_scopes WHERE scope = ?1 AND NOT EXISTS"
        " (SELECT 1 FROM memories WHERE rid BETWEEN ?2 AND ?3)",
        [(s, *bounds(s)) for s in scopes],
    )


async def promote(db: aiosqlite.Connection, scope: int) -> None:
    """Move a scope's vectors from the small-chunk vec0 table to the large-chunk one."""
    lo, hi = bounds(scope)
    rids = [
        (int(r[0]),)
        for r in await db.execute_fetchall(
            "SELECT rid FROM memory_vectors WHERE rid BETWEEN ? AND ?", (lo, hi)
        )
    ]
    # The same sign bits as quantize(): vec_quantize_binary reads the stored float32 blob.
    await db.execute(
        "INSERT INTO memory_vec_large (rowid, scope, bits)"
        " SELECT rid, ?, vec_quantize_binary(vector) FROM memory_vectors WHERE rid BETWEEN ? AND ?",
        (scope, lo, hi),
    )
    await db.executemany("DELETE FROM memory_vec_small WHERE rowid = ?", rids)
