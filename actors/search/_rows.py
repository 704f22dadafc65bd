"""The hybrid index's writes: which entries are new, their rowids and scopes, the inserts.

Private to `actors.search` (`hybrid.py` holds the transaction and the lock).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import aiosqlite
import numpy as np
import numpy.typing as npt

from actors.search import _sql as sql
from actors.search._ranking import quantize
from actors.search._sql import HybridIndexError
from actors.search.entries import Entry, Scope

__all__ = ["COLUMNS", "forgotten", "fresh", "insert", "scope_ids"]

#: The entries table's columns, in the order `insert` writes them.
COLUMNS = "rid, id, source, kind, role, text, source_seq, created_at"


async def forgotten(
    db: aiosqlite.Connection, sources: Collection[tuple[str, str]]
) -> set[tuple[str, str]]:
    """Those of these (space, source) recorded as deleted."""
    by_key = {sql.forgotten_key(space, source): (space, source) for space, source in sources}
    found: set[tuple[str, str]] = set()
    for part in sql.chunks(list(by_key)):
        rows = await db.execute_fetchall(
            f"SELECT key FROM memory_forgotten WHERE key IN ({sql.marks(len(part))})", part
        )
        found.update(by_key[bytes(r[0])] for r in rows)
    return found


async def fresh(db: aiosqlite.Connection, entries: Sequence[Entry]) -> list[int]:
    """Positions of entries of sources not deleted whose (scope, id) is neither stored
    nor earlier in the batch."""
    gone = await forgotten(db, {(e.scope.space, e.source) for e in entries if e.source is not None})
    ids = await scope_ids(db, {e.scope for e in entries})
    stored: set[tuple[int, str]] = set()
    if ids:
        for part in sql.chunks(sorted({e.id for e in entries})):
            rows = await db.execute_fetchall(
                f"SELECT rid, id FROM memories WHERE id IN ({sql.marks(len(part))})", part
            )
            stored.update((int(r[0]) >> sql.SCOPE_SHIFT, str(r[1])) for r in rows)
    seen: set[tuple[Scope, str]] = set()
    out: list[int] = []
    for i, e in enumerate(entries):
        if (e.scope, e.id) in seen or (e.source is not None and (e.scope.space, e.source) in gone):
            continue
        scope = ids.get(e.scope)
        if scope is not None and (scope, e.id) in stored:
            continue
        seen.add((e.scope, e.id))
        out.append(i)
    return out


async def insert(
    db: aiosqlite.Connection,
    entries: list[Entry],
    vecs: npt.NDArray[np.float32],
    *,
    promote_at: int,
) -> None:
    """Store entries (new ones: see `fresh`) with their unit vectors; a scope that
    reaches `promote_at` entries moves to the large-chunk vec0 table."""
    keys = sorted({e.scope for e in entries})
    await db.executemany(
        "INSERT INTO memory_scopes (kind, space, owner) VALUES (?, ?, ?)"
        " ON CONFLICT (kind, space, owner) DO NOTHING",
        keys,
    )
    # key -> [scope, next_seq, tier]
    scope_of: dict[Scope, list[int]] = {}
    for part in sql.chunks(keys):
        rows = await db.execute_fetchall(
            "SELECT kind, space, owner, scope, next_seq, tier FROM memory_scopes"
            f" WHERE (kind, space, owner) IN (VALUES {','.join(['(?,?,?)'] * len(part))})",
            [v for key in part for v in key],
        )
        for row in rows:
            scope_of[Scope(str(row[0]), str(row[1]), str(row[2]))] = [int(v) for v in row[3:6]]
    rids: list[int] = []
    for e in entries:
        slot = scope_of[e.scope]
        if slot[0] > sql.MAX_SCOPE or slot[1] > sql.MAX_SEQ:
            raise HybridIndexError(f"scope {slot[0]} is full")
        rids.append((slot[0] << sql.SCOPE_SHIFT) | slot[1])
        slot[1] += 1
    for scope, seq, tier in scope_of.values():
        if tier == 0 and seq >= promote_at:
            await sql.promote(db, scope)
    for slot in scope_of.values():
        slot[2] = 1 if slot[1] >= promote_at else slot[2]
    await db.executemany(
        "UPDATE memory_scopes SET next_seq = ?, tier = ? WHERE scope = ?",
        [(seq, tier, scope) for scope, seq, tier in scope_of.values()],
    )
    tier_of = {scope: tier for scope, _, tier in scope_of.values()}
    await db.executemany(
        f"INSERT INTO memories ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
        [
            (
                rid,
                e.id,
                e.source,
                e.kind,
                e.role,
                e.text,
                e.source_seq,
                e.created_at.isoformat(),
            )
            for rid, e in zip(rids, entries, strict=True)
        ],
    )
    await db.executemany(
        "INSERT INTO memory_fts (rowid, text) VALUES (?, ?)",
        [(rid, e.text) for rid, e in zip(rids, entries, strict=True)],
    )
    await db.executemany(
        "INSERT INTO memory_vectors (rid, vector) VALUES (?, ?)",
        [(rid, vecs[i].tobytes()) for i, rid in enumerate(rids)],
    )
    bits = quantize(vecs)
    for tier, (table, _) in enumerate(sql.VEC_TABLES):
        await db.executemany(
            f"INSERT INTO {table} (rowid, scope, bits) VALUES (?, ?, vec_bit(?))",
            [
                (rid, rid >> sql.SCOPE_SHIFT, bits[i].tobytes())
                for i, rid in enumerate(rids)
                if tier_of[rid >> sql.SCOPE_SHIFT] == tier
            ],
        )


async def scope_ids(db: aiosqlite.Connection, keys: Collection[Scope]) -> dict[Scope, int]:
    """The ids of those of these scopes that are stored."""
    out: dict[Scope, int] = {}
    for part in sql.chunks(sorted(keys)):
        rows = await db.execute_fetchall(
            "SELECT kind, space, owner, scope FROM memory_scopes"
            f" WHERE (kind, space, owner) IN (VALUES {','.join(['(?,?,?)'] * len(part))})",
            [v for key in part for v in key],
        )
        out.update((Scope(str(r[0]), str(r[1]), str(r[2])), int(r[3])) for r in rows)
    return out
