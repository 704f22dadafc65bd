"""The hybrid index's file: schema, format, metadata and row layout.

Private to `actors.search`: `hybrid.py` holds the entries and their upkeep,
`_rows.py` the writes, `_ranking.py` the search, `connection.py` the
connections; this holds what the tables need. The tables keep the `memory_`
prefix they had when the memory index was the file's only user.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import aiosqlite

from actors.search.connection import Transaction

__all__ = [
    "DROP",
    "FORMAT",
    "MAX_SCOPE",
    "MAX_SEQ",
    "SCOPE_SHIFT",
    "VEC_TABLES",
    "HybridIndexError",
    "bounds",
    "chunks",
    "create",
    "delete_rows",
    "drop",
    "forgotten_key",
    "get_meta",
    "is_stale",
    "marks",
    "promote",
    "set_meta",
    "upgrade",
]


class HybridIndexError(Exception):
    """The index is inconsistent or could not finish a maintenance step."""


#: The layout of the tables, kept in `memory_meta` ('format'). 2: entries belong to
#: scopes (kind, space, owner) with no tenant or session of their own (1, unmarked:
#: memory records with tenant and session columns, knowledge chunks under a fake tenant).
FORMAT = 2


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


def forgotten_key(space: str, source: str) -> bytes:
    """A deleted source's key in `memory_forgotten`: a digest, since no byte of the
    source, its id included, may stay in the file. (Format 1 keyed a memory
    session the same way, with the tenant as space: the table carries over.)"""
    return hashlib.sha256(f"{space}\0{source}".encode()).digest()


SCHEMA = """
CREATE TABLE IF NOT EXISTS memory_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS memory_scopes (
    scope INTEGER PRIMARY KEY, kind TEXT NOT NULL, space TEXT NOT NULL, owner TEXT NOT NULL,
    next_seq INTEGER NOT NULL DEFAULT 0, tier INTEGER NOT NULL DEFAULT 0,
    UNIQUE (kind, space, owner));
CREATE TABLE IF NOT EXISTS memories (
    rid INTEGER PRIMARY KEY, id TEXT NOT NULL, source TEXT, kind TEXT NOT NULL,
    role TEXT NOT NULL, text TEXT NOT NULL, source_seq INTEGER NOT NULL,
    created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS memories_by_id ON memories (id);
CREATE INDEX IF NOT EXISTS memories_by_source ON memories (source) WHERE source IS NOT NULL;
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
        for key, value in (("dim", dim), ("format", FORMAT)):
            await db.execute(
                "INSERT INTO memory_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                (key, value),
            )
        stored = int(await get_meta(db, "dim") or 0)
        if stored != dim:
            raise HybridIndexError(f"index holds {stored}-dim vectors, not {dim}")
        if not in_transaction:
            await db.execute("COMMIT")
    except BaseException:
        if not in_transaction:
            await db.execute("ROLLBACK")
        raise


async def is_stale(db: aiosqlite.Connection) -> bool:
    """Whether the file holds tables of another format than `FORMAT` (a new file does not)."""
    meta = await db.execute_fetchall(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'memory_meta'"
    )
    return bool(list(meta)) and await get_meta(db, "format") != str(FORMAT)


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


async def drop(db: aiosqlite.Connection) -> None:
    """Drop the tables `create` makes (not `memory_forgotten`)."""
    for statement in DROP.split(";"):
        if statement.strip():
            await db.execute(statement)


async def upgrade(db: aiosqlite.Connection, dim: int) -> bool:
    """Replace the tables of an older format with empty ones, in one transaction; returns
    whether they held anything (entries or a log position) that the owner must now
    rebuild. The deleted sources carry over."""
    if not await is_stale(db):
        return False
    async with Transaction(db):
        held = await db.execute_fetchall(
            "SELECT EXISTS (SELECT 1 FROM memories)"
            " OR EXISTS (SELECT 1 FROM memory_meta WHERE key = 'checkpoint')"
        )
        emptied = bool(next(iter(held))[0])
        await drop(db)
        await create(db, dim, in_transaction=True)
    return emptied
