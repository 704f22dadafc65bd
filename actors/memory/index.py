"""The memory index: a projection of the event log in SQLite, sqlite-vec and FTS5.

Partitions. Every record lives in exactly one scope: the user's when the record
names a user (tenant, user), else the session's (tenant, session). A search of
(tenant, session, user) reads at most two scopes, the session's and the user's,
so it sees the session's anonymous memories and every memory of that user in
that tenant, and nothing of another tenant or another user. A memory that names
a user is that user's: a search must name the same user to see it, even from its
own session (the session actor passes the user it pinned at the session's start).

Layout. Scopes get small integer ids; a record's rowid is `scope << 32 | n`, so a
scope is one contiguous rowid range. The vec0 tables are partitioned by scope (a
KNN reads only that partition's chunks) and FTS5 queries take the scope's rowid
range (FTS5 seeks inside its doclists), so both sides scan only the scope.

Two vec0 tables, because vec0 allocates whole chunks per partition: most scopes
are small (a session, a light user) and live in `memory_vec_small` (32-row chunks,
about 2.5 KB on disk per scope instead of 57 KB with vec0's default 1024); a scope
that has received `PROMOTE_AT` memories moves, in the same transaction, to
`memory_vec_large` (1024-row chunks: a 100k-row KNN pays per chunk, so fewer is
faster).

Vectors. vec0 holds 384-bit sign quantisations (`bit[384]`, hamming KNN) for the
candidates; exact cosine on the float32 vectors (a plain table) re-ranks them.

Keywords. FTS5 over the records table (external content, unicode61 without
stemming: the query side must tokenize the same way). Query text never reaches
MATCH as syntax: it is split into word tokens, each quoted as an FTS5 string.
FTS5 finds the matching rows inside the scopes; the BM25 score is computed here
with the scopes' own document frequencies, because FTS5's bm25() reads each
term's whole doclist across every tenant for its IDF (measured: 2.5 ms for one
common word at 1M rows, even when the scope holds four matches). Rarest terms
first, a query reads at most `KEYWORD_TERM_CAP` matching rows; commoner terms
are left out like stop words.

Deletion. `PRAGMA secure_delete` zeroes freed cells and pages, FTS5 runs with
its 'secure-delete' option (entries are removed, not shadowed), vec0 zeroes a
deleted vector in its chunk and drops emptied chunks. That is not enough: b-tree
page splits leave stale copies of moved rows in the unused middle of pages, and
FTS5 keeps leaf-separator terms in `%_idx`, so deleted text can survive in the
file (measured: 9 of 10k deleted rows). A scrub therefore follows: FTS5
'rebuild' (the index and its separators made again from live rows), VACUUM
(every page rewritten), then a TRUNCATE checkpoint so no old page image survives
in the WAL. It costs a few ms per MB of file (about 2 s at 100k memories); a
caller erasing many sessions passes `scrub=False` and calls `scrub()` once.

Forgetting. A deleted session stays deleted: `delete_session` records it in
`memory_forgotten` (a digest of tenant and session id, not the id itself) in the
transaction that deletes its rows, and `add` drops, inside its own transaction,
every record of a recorded session. The projection reads and embeds a batch
before it stores it, so a deletion can land in between; whichever transaction
comes first, no row of the session is left. `reset` keeps the record, so a
rebuild from the log never brings a deleted session back either.

Model. `memory_meta` keeps the id of the embedding model that made the vectors
(`model`); opened with another model, the index empties itself and its owner
rebuilds it from the log (vectors of two models do not compare).

Writes go through one connection guarded by a lock; searches through two read-only
ones (vector side and keyword side run at once), so recall never queues behind
ingestion (WAL gives each read a snapshot).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import unicodedata
from collections.abc import Collection, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import aiosqlite
import msgspec
import numpy as np
import numpy.typing as npt
import pysqlite3.dbapi2 as _sqlite  # type: ignore[import-untyped]
import structlog

from actors.memory import _sql as sql
from actors.memory._sql import MemoryIndexError
from contracts.memory import MemoryHit

__all__ = [
    "KEYWORD_TERM_CAP",
    "PROMOTE_AT",
    "RRF_K",
    "VECTOR_CANDIDATES",
    "MemoryIndex",
    "MemoryIndexError",
    "MemoryRecord",
    "fts_terms",
    "quantize",
]

log = structlog.get_logger("veil.memory")

#: Hamming candidates read per scope before the exact cosine re-rank.
VECTOR_CANDIDATES = 48
#: A query term matching more rows than this in the searched scopes is ignored.
KEYWORD_TERM_CAP = 2000
#: Reciprocal Rank Fusion constant.
RRF_K = 60
#: Candidates of each side that take part in the fusion.
FUSED_HEAD = 10
#: Weight of the keyword side in the fusion (the vector side weighs 1).
KEYWORD_WEIGHT = 0.5
#: A scope moves to the large-chunk vec0 table once it has received this many memories.
PROMOTE_AT = 2048

_STOP_WORDS = frozenset(
    """
    a about after again all am an and any are as at be because been before being between
    both but by can could did do does doing don down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its
    itself just let me more most my myself no nor not now of off on once only or other our
    ours ourselves out over own same she should so some such than that the their theirs
    them themselves then there these they this those through to too under until up very was
    we were what when where which while who whom why will with would you your yours
    yourself yourselves s t
    """.split()  # noqa: SIM905 (a word list reads better as text)
)
_WORD = re.compile(r"[^\W_]+")
_MAX_TERMS = 16


class _Scope(NamedTuple):
    id: int
    tier: int  # index into sql.VEC_TABLES
    size: int  # memories it has received (for IDF)


class MemoryRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One memory: a message, a fact or a summary, with its place in the log."""

    id: str
    tenant: str
    user_id: str | None
    session_id: str
    kind: str  # "message" | "fact" | "summary"
    role: str
    text: str
    source_seq: int
    created_at: datetime


def quantize(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """Sign bits of each row, packed as sqlite-vec's `vec_quantize_binary` packs them."""
    return np.packbits(np.asarray(vectors) > 0, axis=-1, bitorder="little")


def fts_terms(text: str) -> list[str]:
    """Query words as FTS5 tokenizes them (lower case, no diacritics), minus stop words."""
    folded = unicodedata.normalize("NFKD", text.lower())
    folded = "".join(ch for ch in folded if not unicodedata.combining(ch))
    terms: list[str] = []
    for word in _WORD.findall(folded):
        if word not in _STOP_WORDS and word not in terms:
            terms.append(word)
    return terms[:_MAX_TERMS]


def _unit(vectors: npt.ArrayLike, dim: int) -> npt.NDArray[np.float32]:
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"expected vectors of {dim} floats, got shape {arr.shape}")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if not np.all(np.isfinite(arr)) or np.any(norms == 0):
        raise ValueError("vectors must be finite and non-zero")
    return np.ascontiguousarray(arr / norms, dtype=np.float32)


def _scope_key(r: MemoryRecord) -> tuple[str, str, str]:
    return ("u", r.tenant, r.user_id) if r.user_id is not None else ("s", r.tenant, r.session_id)


_ROW_COLUMNS = "rid, id, session_id, user_id, kind, role, text, source_seq, created_at"


async def _forgotten(
    db: aiosqlite.Connection, sessions: Collection[tuple[str, str]]
) -> set[tuple[str, str]]:
    by_key = {sql.forgotten_key(tenant, sid): (tenant, sid) for tenant, sid in sessions}
    found: set[tuple[str, str]] = set()
    for part in sql.chunks(list(by_key)):
        rows = await db.execute_fetchall(
            f"SELECT key FROM memory_forgotten WHERE key IN ({sql.marks(len(part))})", part
        )
        found.update(by_key[bytes(r[0])] for r in rows)
    return found


class MemoryIndex:
    """Hybrid (vector + BM25) recall over memories, partitioned by tenant and owner."""

    def __init__(
        self,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        keyword_reader: aiosqlite.Connection,
        dim: int,
    ) -> None:
        self._writer = writer
        self._reader = reader
        self._keyword_reader = keyword_reader
        self.dim = dim
        self._write_lock = asyncio.Lock()
        #: True when `open` emptied the index because its vectors came from another model.
        self.model_changed = False

    @classmethod
    async def open(
        cls, path: str | Path, *, dim: int = 384, model: str | None = None
    ) -> MemoryIndex:
        """Open (creating if needed) the index file at `path`.

        With `model` (an embedder's `model_id`), an index built by another model, or
        by one it does not know, is emptied for a rebuild; `model_changed` says so.
        """
        index = await cls._open(path, dim)
        if model is not None:
            try:
                await index._adopt(model)
            except BaseException:
                await index.close()
                raise
        return index

    @classmethod
    async def _open(cls, path: str | Path, dim: int) -> MemoryIndex:
        name = str(path)
        writer = await sql.connect(name, reader=False)
        try:
            await writer.execute("PRAGMA journal_mode = WAL")
            await sql.create(writer, dim)
            if name == ":memory:":
                return cls(writer, writer, writer, dim)
            reader = await sql.connect(name, reader=True)
            try:
                keyword_reader = await sql.connect(name, reader=True)
            except BaseException:
                await reader.close()
                raise
        except BaseException:
            await writer.close()
            raise
        return cls(writer, reader, keyword_reader, dim)

    async def close(self) -> None:
        """Close every connection."""
        for db in {id(c): c for c in (self._keyword_reader, self._reader, self._writer)}.values():
            await db.close()

    # -- writing ----------------------------------------------------------

    async def add(
        self,
        records: Sequence[MemoryRecord],
        vectors: npt.ArrayLike,
        *,
        checkpoint: int | None = None,
    ) -> None:
        """Store records not stored yet (by tenant and id) and the log position, atomically.

        Records of a session deleted with `delete_session` are left out, whenever it was.
        """
        vecs = _unit(vectors, self.dim) if len(records) else np.zeros((0, self.dim), np.float32)
        if len(vecs) != len(records):
            raise ValueError(f"{len(records)} records but {len(vecs)} vectors")
        async with self._write_lock, self._transaction() as db:
            fresh = await self._fresh(db, records)
            if fresh:
                await self._insert(db, [records[i] for i in fresh], vecs[fresh])
            if checkpoint is not None:
                await db.execute(
                    "INSERT INTO memory_meta (key, value) VALUES ('checkpoint', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
                    (checkpoint,),
                )

    async def delete_session(self, tenant: str, session_id: str, *, scrub: bool = True) -> int:
        """Erase every memory of a session, from every table and from the file; returns how many.

        With `scrub=False` the rows are gone from every table at once, but stale copies may
        stay in the file until `scrub()` runs.
        """
        async with self._write_lock:
            async with self._transaction() as db:
                rows = [
                    (int(r[0]), str(r[1]))
                    for r in await db.execute_fetchall(
                        "SELECT rid, text FROM memories WHERE tenant = ? AND session_id = ?",
                        (tenant, session_id),
                    )
                ]
                await sql.delete_rows(db, rows)
                await db.execute(
                    "INSERT INTO memory_forgotten (key) VALUES (?) ON CONFLICT (key) DO NOTHING",
                    (sql.forgotten_key(tenant, session_id),),
                )
            await (self._scrub_file() if scrub else self._truncate_wal())
        return len(rows)

    async def delete_ids(self, tenant: str, ids: Collection[str], *, scrub: bool = True) -> int:
        """Erase the tenant's memories with these ids; returns how many existed."""
        found: list[tuple[int, str]] = []
        async with self._write_lock:
            async with self._transaction() as db:
                for part in sql.chunks(sorted(ids)):
                    rows = await db.execute_fetchall(
                        "SELECT rid, text FROM memories"
                        f" WHERE tenant = ? AND id IN ({sql.marks(len(part))})",
                        (tenant, *part),
                    )
                    found.extend((int(r[0]), str(r[1])) for r in rows)
                await sql.delete_rows(db, found)
            await (self._scrub_file() if scrub else self._truncate_wal())
        return len(found)

    async def scrub(self) -> None:
        """Rewrite the file so that no byte of a deleted memory survives anywhere in it."""
        async with self._write_lock:
            await self._scrub_file()

    async def reset(self) -> None:
        """Drop every memory and the checkpoint (for a rebuild from the log); keeps the model
        and the deleted sessions."""
        async with self._write_lock:
            async with self._transaction() as db:
                model = await sql.get_meta(db, "model")
                for statement in sql.DROP.split(";"):
                    if statement.strip():
                        await db.execute(statement)
                await sql.create(db, self.dim, in_transaction=True)
                if model is not None:
                    await sql.set_meta(db, "model", model)
            await self._writer.execute("VACUUM")
            await self._truncate_wal()

    async def _adopt(self, model: str) -> None:
        stored = await sql.get_meta(self._writer, "model")
        if stored == model:
            return
        memories = await self.count()
        if stored is not None or memories or await self.checkpoint():
            log.warning("memory.index_model_changed", was=stored, now=model, memories=memories)
            await self.reset()
            self.model_changed = True
        async with self._write_lock, self._transaction() as db:
            await sql.set_meta(db, "model", model)

    # -- reading ----------------------------------------------------------

    async def checkpoint(self) -> int:
        """The last log position stored with `add` (0 when none)."""
        rows = list(
            await self._reader.execute_fetchall(
                "SELECT value FROM memory_meta WHERE key = 'checkpoint'"
            )
        )
        return int(rows[0][0]) if rows else 0

    async def count(self) -> int:
        """How many memories are stored."""
        rows = await self._reader.execute_fetchall("SELECT count(*) FROM memories")
        return int(next(iter(rows))[0])

    async def forgotten(self, sessions: Collection[tuple[str, str]]) -> set[tuple[str, str]]:
        """Those of these (tenant, session id) that `delete_session` erased."""
        return await _forgotten(self._reader, sessions)

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
        """Hybrid recall: vector and keyword candidates fused by reciprocal rank."""
        scopes = await self._scopes(tenant, session_id, user_id)
        if not scopes or k <= 0:
            return []
        pool = max(k * 4, 40)
        # Two read connections, two threads: SQLite releases the GIL, so both sides overlap.
        vec, kw = await asyncio.gather(
            self._vector_candidates(scopes, query_vector, pool, kinds),
            self._keyword_candidates(scopes, query_text, pool, kinds),
        )
        # Fuse only each side's head: with whole candidate pools, anything both sides
        # found (any shared common word) outranked every paraphrase found by meaning
        # alone. Keywords weigh half: they confirm more than they discover.
        # (bench/memory_eval.py: recall@5 0.818 -> 0.905 on its 137 questions.)
        head = max(k, FUSED_HEAD)
        fused: dict[int, float] = {}
        for ranking, weight in ((vec[:head], 1.0), (kw[:head], KEYWORD_WEIGHT)):
            for rank, (rid, _) in enumerate(ranking, 1):
                fused[rid] = fused.get(rid, 0.0) + weight / (RRF_K + rank)
        sims = dict(vec)
        best = sorted(fused, key=lambda rid: (-fused[rid], -sims.get(rid, -2.0), rid))[:k]
        return await self._hits(tenant, session_id, user_id, best, fused, vec, kw)

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
        scopes = await self._scopes(tenant, session_id, user_id)
        if not scopes or k <= 0:
            return []
        vec = (await self._vector_candidates(scopes, query_vector, k, kinds))[:k]
        scores = dict(vec)
        return await self._hits(tenant, session_id, user_id, [r for r, _ in vec], scores, vec, [])

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
        """Keyword-only recall (score: BM25), for comparison."""
        scopes = await self._scopes(tenant, session_id, user_id)
        if not scopes or k <= 0:
            return []
        kw = (await self._keyword_candidates(scopes, query_text, k, kinds))[:k]
        scores = dict(kw)
        return await self._hits(tenant, session_id, user_id, [r for r, _ in kw], scores, [], kw)

    async def dump(self) -> list[tuple[Any, ...]]:
        """Every memory as a canonical tuple (no rowids or insertion order), sorted."""
        bits = {
            int(r[0]): bytes(r[1])
            for table, _ in sql.VEC_TABLES
            for r in await self._reader.execute_fetchall(f"SELECT rowid, bits FROM {table}")
        }
        rows = await self._reader.execute_fetchall(
            "SELECT m.rid, m.tenant, m.id, m.user_id, m.session_id, m.kind, m.role, m.text,"
            " m.source_seq, m.created_at, s.kind, s.owner, v.vector FROM memories m"
            " JOIN memory_scopes s ON s.scope = m.rid >> 32"
            " JOIN memory_vectors v ON v.rid = m.rid"
        )
        out = [
            (*r[1:12], hashlib.sha256(bytes(r[12])).hexdigest(), bits.get(int(r[0]), b"").hex())
            for r in rows
        ]
        return sorted(out, key=repr)

    async def verify(self) -> None:
        """Raise MemoryIndexError unless records, vectors, vec0 and FTS5 agree."""
        counts = [
            int(next(iter(await self._reader.execute_fetchall(query)))[0])
            for query in (
                "SELECT count(*) FROM memories",
                "SELECT count(*) FROM memory_vectors",
                (
                    "SELECT (SELECT count(*) FROM memory_vec_small)"
                    " + (SELECT count(*) FROM memory_vec_large)"
                ),
                "SELECT count(*) FROM memory_fts_docsize",
            )
        ]
        if len(set(counts)) != 1:
            raise MemoryIndexError(f"row counts disagree (records, vectors, vec0, fts): {counts}")
        async with self._write_lock:
            try:
                await self._writer.execute(
                    "INSERT INTO memory_fts (memory_fts, rank) VALUES ('integrity-check', 1)"
                )
            except _sqlite.DatabaseError as exc:
                raise MemoryIndexError(f"FTS5 index disagrees with the records: {exc}") from exc

    # -- internals --------------------------------------------------------

    def _transaction(self) -> sql.Transaction:
        return sql.Transaction(self._writer)

    async def _scrub_file(self) -> None:
        # 'rebuild', not 'optimize': optimize leaves a one-segment index (and its %_idx) as is.
        await self._writer.execute("INSERT INTO memory_fts (memory_fts) VALUES ('rebuild')")
        await self._writer.execute("VACUUM")
        await self._truncate_wal()

    async def _truncate_wal(self) -> None:
        """Copy the WAL into the file and truncate it, so old page images leave the disk."""
        for _ in range(50):
            rows = await self._writer.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)")
            if int(next(iter(rows))[0]) == 0:
                return
            await asyncio.sleep(0.05)
        raise MemoryIndexError("deleted, but the WAL could not be truncated (readers busy)")

    async def _fresh(self, db: aiosqlite.Connection, records: Sequence[MemoryRecord]) -> list[int]:
        """Positions of records of sessions not deleted whose (tenant, id) is neither stored
        nor earlier in the batch."""
        gone = await _forgotten(db, {(r.tenant, r.session_id) for r in records})
        stored: set[tuple[str, str]] = set()
        by_tenant: dict[str, list[str]] = {}
        for r in records:
            by_tenant.setdefault(r.tenant, []).append(r.id)
        for tenant, ids in by_tenant.items():
            for part in sql.chunks(ids):
                rows = await db.execute_fetchall(
                    f"SELECT id FROM memories WHERE tenant = ? AND id IN ({sql.marks(len(part))})",
                    (tenant, *part),
                )
                stored.update((tenant, str(row[0])) for row in rows)
        fresh: list[int] = []
        for i, r in enumerate(records):
            if (r.tenant, r.id) not in stored and (r.tenant, r.session_id) not in gone:
                stored.add((r.tenant, r.id))
                fresh.append(i)
        return fresh

    async def _insert(
        self, db: aiosqlite.Connection, records: list[MemoryRecord], vecs: npt.NDArray[np.float32]
    ) -> None:
        keys = sorted({_scope_key(r) for r in records})
        await db.executemany(
            "INSERT INTO memory_scopes (kind, tenant, owner) VALUES (?, ?, ?)"
            " ON CONFLICT (kind, tenant, owner) DO NOTHING",
            keys,
        )
        # key -> [scope, next_seq, tier]
        scope_of: dict[tuple[str, str, str], list[int]] = {}
        for part in sql.chunks(keys):
            rows = await db.execute_fetchall(
                "SELECT kind, tenant, owner, scope, next_seq, tier FROM memory_scopes"
                f" WHERE (kind, tenant, owner) IN (VALUES {','.join(['(?,?,?)'] * len(part))})",
                [v for key in part for v in key],
            )
            for row in rows:
                scope_of[(str(row[0]), str(row[1]), str(row[2]))] = [int(v) for v in row[3:6]]
        rids: list[int] = []
        for r in records:
            slot = scope_of[_scope_key(r)]
            if slot[0] > sql.MAX_SCOPE or slot[1] > sql.MAX_SEQ:
                raise MemoryIndexError(f"scope {slot[0]} is full")
            rids.append((slot[0] << sql.SCOPE_SHIFT) | slot[1])
            slot[1] += 1
        for scope, seq, tier in scope_of.values():
            if tier == 0 and seq >= PROMOTE_AT:
                await sql.promote(db, scope)
        for slot in scope_of.values():
            slot[2] = 1 if slot[1] >= PROMOTE_AT else slot[2]
        await db.executemany(
            "UPDATE memory_scopes SET next_seq = ?, tier = ? WHERE scope = ?",
            [(seq, tier, scope) for scope, seq, tier in scope_of.values()],
        )
        tier_of = {scope: tier for scope, _, tier in scope_of.values()}
        await db.executemany(
            f"INSERT INTO memories ({_ROW_COLUMNS}, tenant) VALUES (?,?,?,?,?,?,?,?,?,?)",
            [
                (
                    rid,
                    r.id,
                    r.session_id,
                    r.user_id,
                    r.kind,
                    r.role,
                    r.text,
                    r.source_seq,
                    r.created_at.isoformat(),
                    r.tenant,
                )
                for rid, r in zip(rids, records, strict=True)
            ],
        )
        await db.executemany(
            "INSERT INTO memory_fts (rowid, text) VALUES (?, ?)",
            [(rid, r.text) for rid, r in zip(rids, records, strict=True)],
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

    async def _scopes(self, tenant: str, session_id: str, user_id: str | None) -> list[_Scope]:
        """The session's scope and the user's, those that exist."""
        rows = await self._reader.execute_fetchall(
            "SELECT scope, tier, next_seq FROM memory_scopes WHERE tenant = ?"
            " AND ((kind = 's' AND owner = ?) OR (kind = 'u' AND owner = ?)) ORDER BY scope",
            (tenant, session_id, user_id),
        )
        return [_Scope(int(r[0]), int(r[1]), int(r[2])) for r in rows]

    async def _vector_candidates(
        self,
        scopes: list[_Scope],
        query_vector: npt.ArrayLike,
        pool: int,
        kinds: Collection[str] | None,
    ) -> list[tuple[int, float]]:
        """(rowid, cosine) best first: hamming KNN per scope, re-ranked on float vectors."""
        q = _unit(query_vector, self.dim)[0]
        # A kind filter applies after the KNN, so read deeper to still fill the pool.
        per_scope = max(VECTOR_CANDIDATES, pool) * (4 if kinds else 1)
        knn = " UNION ALL ".join(
            f"SELECT rowid FROM {sql.VEC_TABLES[scope.tier][0]}"
            f" WHERE bits MATCH vec_bit(?1) AND k = ?2 AND scope = ?{3 + i}"
            for i, scope in enumerate(scopes)
        )
        query = f"SELECT v.rid, v.vector FROM ({knn}) c JOIN memory_vectors v ON v.rid = c.rowid"
        args: list[Any] = [quantize(q).tobytes(), per_scope, *(scope.id for scope in scopes)]
        if kinds:
            marks = ",".join(f"?{3 + len(scopes) + j}" for j in range(len(kinds)))
            query += f" JOIN memories m ON m.rid = c.rowid WHERE m.kind IN ({marks})"
            args.extend(sorted(kinds))
        rows = list(await self._reader.execute_fetchall(query, args))
        if not rows:
            return []
        rids = np.array([int(r[0]) for r in rows], dtype=np.int64)
        mat = np.frombuffer(b"".join(bytes(r[1]) for r in rows), dtype=np.float32)
        sims = mat.reshape(len(rows), self.dim) @ q
        order = np.argsort(-sims, kind="stable")[:pool]
        return [(int(rids[i]), float(sims[i])) for i in order]

    async def _keyword_candidates(
        self,
        scopes: list[_Scope],
        query_text: str,
        pool: int,
        kinds: Collection[str] | None,
    ) -> list[tuple[int, float]]:
        """(rowid, BM25) best first, with the searched scopes' own statistics."""
        terms = fts_terms(query_text)
        if not terms:
            return []
        db = self._keyword_reader
        ranges = [sql.bounds(s.id) for s in scopes]
        in_scopes = "+".join(
            "(SELECT count(*) FROM memory_fts WHERE memory_fts MATCH ? AND rowid BETWEEN ? AND ?)"
            for _ in scopes
        )
        rows = await db.execute_fetchall(
            "SELECT " + ", ".join(f"({in_scopes})" for _ in terms),
            [v for t in terms for lo, hi in ranges for v in (f'"{t}"', lo, hi)],
        )
        df = dict(zip(terms, (int(c) for c in next(iter(rows))), strict=True))
        # Rarest first, while the rows to read stay under the cap; a query of common
        # words only keeps its rarest one, read over its newest matches.
        kept: list[str] = []
        budget = KEYWORD_TERM_CAP
        for t in sorted((t for t in terms if df[t] > 0), key=lambda t: df[t]):
            if df[t] <= budget or not kept:
                kept.append(t)
                budget -= df[t]
        if not kept:
            return []
        arms, args = [], []
        for i, t in enumerate(kept):
            for lo, hi in ranges:
                arms.append(
                    f"SELECT * FROM (SELECT {i} AS t, f.rowid AS rid FROM memory_fts f"
                    + (" JOIN memories m ON m.rid = f.rowid" if kinds else "")
                    + " WHERE memory_fts MATCH ? AND f.rowid BETWEEN ? AND ?"
                    + (f" AND m.kind IN ({sql.marks(len(kinds))})" if kinds else "")
                    + f" ORDER BY f.rowid DESC LIMIT {KEYWORD_TERM_CAP})"
                )
                args += [f'"{t}"', lo, hi, *sorted(kinds or ())]
        # BM25 where a term counts once per message (they are short) and length is not
        # normalised (b = 0); IDF from the scopes searched, so no other tenant's text
        # weighs on the ranking and no query pays for the size of the whole index.
        total = sum(s.size for s in scopes)
        idf = [math.log(1 + (total - df[t] + 0.5) / (df[t] + 0.5)) for t in kept]
        score: dict[int, float] = {}
        for t, rid in await db.execute_fetchall(" UNION ALL ".join(arms), args):
            score[int(rid)] = score.get(int(rid), 0.0) + idf[int(t)]
        best = sorted(score.items(), key=lambda item: (-item[1], -item[0]))
        return best[:pool]

    async def _hits(
        self,
        tenant: str,
        session_id: str,
        user_id: str | None,
        order: list[int],
        scores: dict[int, float],
        vec: list[tuple[int, float]],
        kw: list[tuple[int, float]],
    ) -> list[MemoryHit]:
        if not order:
            return []
        vrank = {rid: (rank, sim) for rank, (rid, sim) in enumerate(vec, 1)}
        krank = {rid: (rank, bm) for rank, (rid, bm) in enumerate(kw, 1)}
        # The scope is checked again on the rows themselves, not only by partition.
        rows = await self._reader.execute_fetchall(
            # The unary + keeps the planner on rowid lookups, off the (tenant, session) index.
            f"SELECT {_ROW_COLUMNS} FROM memories WHERE rid IN ({sql.marks(len(order))})"
            " AND +tenant = ? AND ((+user_id IS NULL AND +session_id = ?)"
            " OR (? IS NOT NULL AND +user_id = ?))",
            (*order, tenant, session_id, user_id, user_id),
        )
        by_rid = {int(r[0]): r for r in rows}
        hits: list[MemoryHit] = []
        for rid in order:
            r = by_rid.get(rid)
            if r is None:
                continue
            v, kk = vrank.get(rid), krank.get(rid)
            hits.append(
                MemoryHit(
                    id=r[1],
                    session_id=r[2],
                    user_id=r[3],
                    kind=r[4],
                    role=r[5],
                    text=r[6],
                    source_seq=int(r[7]),
                    created_at=datetime.fromisoformat(r[8]),
                    score=scores[rid],
                    vector_rank=v[0] if v else None,
                    vector_similarity=v[1] if v else None,
                    keyword_rank=kk[0] if kk else None,
                    bm25=kk[1] if kk else None,
                )
            )
        return hits
