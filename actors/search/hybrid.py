"""The hybrid index: vector and keyword search over texts in SQLite, sqlite-vec and FTS5.

Long-term memory (`actors.memory.index`) and the knowledge base
(`actors.knowledge.index`) both store their texts here, each in its own file.

Scopes. Every entry lives in exactly one scope, named by a `Scope(kind, space,
owner)`: memory puts a record in ("u", tenant, user) when it names a user, else in
("s", tenant, session); the knowledge base puts a chunk in ("c", "", collection).
A search names the scopes it reads, and sees nothing else: no key is reserved, and
no owner of one kind stands in for another (a memory search of any tenant, even one
named "__kb__" or "", with a session named like a collection, finds none of the
collection's chunks). An entry's id is unique within its scope.

Layout. Scopes get small integer ids; an entry's rowid is `scope << 32 | n`, so a
scope is one contiguous rowid range. The vec0 tables are partitioned by scope (a
KNN reads only that partition's chunks) and FTS5 queries take the scope's rowid
range (FTS5 seeks inside its doclists), so both sides scan only the scope.

Two vec0 tables, because vec0 allocates whole chunks per partition: most scopes
are small (a session, a light user) and live in `memory_vec_small` (32-row chunks,
about 2.5 KB on disk per scope instead of 57 KB with vec0's default 1024); a scope
that has received `PROMOTE_AT` entries moves, in the same transaction, to
`memory_vec_large` (1024-row chunks: a 100k-row KNN pays per chunk, so fewer is
faster).

Vectors. vec0 holds 384-bit sign quantisations (`bit[384]`, hamming KNN) for the
candidates; exact cosine on the float32 vectors (a plain table) re-ranks them.

Keywords. FTS5 over the entries table (external content, unicode61 without
stemming: the query side must tokenize the same way). Query text never reaches
MATCH as syntax: it is split into word tokens, each quoted as an FTS5 string.
FTS5 finds the matching rows inside the scopes; the BM25 score is computed here
with the scopes' own document frequencies, because FTS5's bm25() reads each
term's whole doclist across every scope for its IDF (measured: 2.5 ms for one
common word at 1M rows, even when the scope holds four matches). Rarest terms
first, a query reads at most `KEYWORD_TERM_CAP` matching rows; commoner terms
are left out like stop words.

Fusion. Each side's head is fused by weighted reciprocal rank (`_ranking.fuse`); the
caller may pick the head and the keyword weight (memory fuses unweighted, see
`actors.memory.index`; the knowledge base keeps the defaults).

Deletion. `PRAGMA secure_delete` zeroes freed cells and pages, FTS5 runs with
its 'secure-delete' option (entries are removed, not shadowed), vec0 zeroes a
deleted vector in its chunk and drops emptied chunks. That is not enough: b-tree
page splits leave stale copies of moved rows in the unused middle of pages, and
FTS5 keeps leaf-separator terms in `%_idx`, so deleted text can survive in the
file (measured: 9 of 10k deleted rows). A scrub therefore follows: FTS5
'rebuild' (the index and its separators made again from live rows), VACUUM
(every page rewritten), then a TRUNCATE checkpoint so no old page image survives
in the WAL. It costs a few ms per MB of file (about 2 s at 100k entries); a
caller erasing much passes `scrub=False` and calls `scrub()` once.

Forgetting. An entry may name its `source` (memory: the session it came from).
`delete_source` erases a source's entries in every scope of a space (of the
kinds given) and records the source in `memory_forgotten` (a digest of space and
source, not the names), in one transaction; `add` drops, inside its own
transaction, every entry of a recorded source. A caller that embeds a batch
before it stores it may see a deletion land in between; whichever transaction
comes first, no entry of the source is left. `reset` keeps the record, so a
rebuild from the log never brings a deleted source back either.

Model and format. `memory_meta` keeps the id of the embedding model that made
the vectors (`model`) and the layout of the tables (`format`, `_sql.FORMAT`).
Opened with another model, or found in an older format, the index empties
itself (`emptied`) and its owner rebuilds it from the log: vectors of two models
do not compare, and old tables do not fit the queries.

Writes go through one connection guarded by a lock; searches through two read-only
ones (vector side and keyword side run at once), so a search never queues behind
a write (WAL gives each read a snapshot).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import aiosqlite
import numpy as np
import numpy.typing as npt
import pysqlite3.dbapi2 as _sqlite  # type: ignore[import-untyped]
import structlog

from actors.search import _ranking as ranking
from actors.search import _rows
from actors.search import _sql as sql
from actors.search._ranking import (
    KEYWORD_TERM_CAP,
    RRF_K,
    VECTOR_CANDIDATES,
    ScopeRow,
    fts_terms,
    quantize,
    unit,
)
from actors.search._sql import HybridIndexError
from actors.search.connection import Transaction, connect
from actors.search.entries import Entry, Hit, Scope

__all__ = [
    "KEYWORD_TERM_CAP",
    "PROMOTE_AT",
    "RRF_K",
    "VECTOR_CANDIDATES",
    "Entry",
    "Hit",
    "HybridIndex",
    "HybridIndexError",
    "Scope",
    "fts_terms",
    "quantize",
]

log = structlog.get_logger("veil.search")

#: A scope moves to the large-chunk vec0 table once it has received this many entries.
PROMOTE_AT = 2048


class _Found(NamedTuple):
    scope: ScopeRow
    key: Scope


def _in_space(space: str, scope_kinds: Collection[str]) -> tuple[str, list[str]]:
    """SQL (on `rid`) and arguments for: the entry is in a scope of `space` of these kinds."""
    # Correlated, so that each row found costs one lookup, however many scopes the space has.
    where = (
        "EXISTS (SELECT 1 FROM memory_scopes s WHERE s.scope = rid >> 32 AND s.space = ?"
        f" AND s.kind IN ({sql.marks(len(scope_kinds))}))"
    )
    return where, [space, *sorted(scope_kinds)]


class HybridIndex:
    """Hybrid (vector + BM25) search over texts, partitioned into scopes."""

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
        #: True when `open` emptied the index because its tables had an older layout.
        self.format_changed = False

    @property
    def emptied(self) -> bool:
        """Whether `open` emptied the index, which its owner must rebuild from the log."""
        return self.model_changed or self.format_changed

    @classmethod
    async def open(
        cls, path: str | Path, *, dim: int = 384, model: str | None = None
    ) -> HybridIndex:
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
    async def _open(cls, path: str | Path, dim: int) -> HybridIndex:
        name = str(path)
        writer = await connect(name, reader=False)
        try:
            await writer.execute("PRAGMA journal_mode = WAL")
            format_changed = await sql.upgrade(writer, dim)
            if format_changed:
                log.warning("search.index_format_changed", path=name, now=sql.FORMAT)
            await sql.create(writer, dim)
            if name == ":memory:":
                index = cls(writer, writer, writer, dim)
            else:
                reader = await connect(name, reader=True)
                try:
                    keyword_reader = await connect(name, reader=True)
                except BaseException:
                    await reader.close()
                    raise
                index = cls(writer, reader, keyword_reader, dim)
        except BaseException:
            await writer.close()
            raise
        index.format_changed = format_changed
        return index

    async def close(self) -> None:
        """Close every connection."""
        for db in {id(c): c for c in (self._keyword_reader, self._reader, self._writer)}.values():
            await db.close()

    # -- writing ----------------------------------------------------------

    async def add(
        self,
        entries: Sequence[Entry],
        vectors: npt.ArrayLike,
        *,
        checkpoint: int | None = None,
    ) -> None:
        """Store entries not stored yet (by scope and id) and the log position, atomically.

        Entries of a source deleted with `delete_source` are left out, whenever it was.
        """
        vecs = unit(vectors, self.dim) if len(entries) else np.zeros((0, self.dim), np.float32)
        if len(vecs) != len(entries):
            raise ValueError(f"{len(entries)} entries but {len(vecs)} vectors")
        async with self._write_lock, self._transaction() as db:
            fresh = await _rows.fresh(db, entries)
            if fresh:
                await _rows.insert(
                    db, [entries[i] for i in fresh], vecs[fresh], promote_at=PROMOTE_AT
                )
            if checkpoint is not None:
                await db.execute(
                    "INSERT INTO memory_meta (key, value) VALUES ('checkpoint', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
                    (checkpoint,),
                )

    async def delete_source(
        self, space: str, scope_kinds: Collection[str], source: str, *, scrub: bool = True
    ) -> int:
        """Erase every entry of `source` in the scopes of `space` of these kinds, from every
        table and from the file, and refuse the source's entries from now on; returns how
        many were erased.

        With `scrub=False` the rows are gone from every table at once, but stale copies may
        stay in the file until `scrub()` runs.
        """
        in_space, args = _in_space(space, scope_kinds)
        return await self._delete(
            [(f"SELECT rid, text FROM memories WHERE source = ? AND {in_space}", [source, *args])],
            scrub=scrub,
            forget=(space, source),
        )

    async def delete_ids(
        self, space: str, scope_kinds: Collection[str], ids: Collection[str], *, scrub: bool = True
    ) -> int:
        """Erase the entries with these ids in the scopes of `space` of these kinds; returns
        how many existed."""
        in_space, args = _in_space(space, scope_kinds)
        return await self._delete(
            [
                (
                    (
                        f"SELECT rid, text FROM memories WHERE id IN ({sql.marks(len(part))})"
                        f" AND {in_space}"
                    ),
                    [*part, *args],
                )
                for part in sql.chunks(sorted(ids))
            ],
            scrub=scrub,
        )

    async def scrub(self) -> None:
        """Rewrite the file so that no byte of a deleted entry survives anywhere in it."""
        async with self._write_lock:
            await self._scrub_file()

    async def reset(self) -> None:
        """Drop every entry and the checkpoint (for a rebuild from the log); keeps the model
        and the deleted sources."""
        async with self._write_lock:
            async with self._transaction() as db:
                model = await sql.get_meta(db, "model")
                await sql.drop(db)
                await sql.create(db, self.dim, in_transaction=True)
                if model is not None:
                    await sql.set_meta(db, "model", model)
            await self._writer.execute("VACUUM")
            await self._truncate_wal()

    async def _adopt(self, model: str) -> None:
        stored = await sql.get_meta(self._writer, "model")
        if stored == model:
            return
        entries = await self.count()
        if stored is not None or entries or await self.checkpoint():
            log.warning("search.index_model_changed", was=stored, now=model, entries=entries)
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
        """How many entries are stored."""
        rows = await self._reader.execute_fetchall("SELECT count(*) FROM memories")
        return int(next(iter(rows))[0])

    async def forgotten(self, sources: Collection[tuple[str, str]]) -> set[tuple[str, str]]:
        """Those of these (space, source) that `delete_source` erased."""
        return await _rows.forgotten(self._reader, sources)

    async def search(
        self,
        scopes: Iterable[Scope],
        *,
        query_vector: npt.ArrayLike,
        query_text: str,
        k: int = 10,
        kinds: Collection[str] | None = None,
        head: int = ranking.FUSED_HEAD,
        keyword_weight: float = ranking.KEYWORD_WEIGHT,
        pool: int = 40,
        common: tuple[float, int] | None = None,
    ) -> list[Hit]:
        """Hybrid search of these scopes: vector and keyword candidates fused by rank.

        `pool` candidates are read from each side, the first `head` of each fused, the
        keyword side weighing `keyword_weight` (the vector side 1). With `common`
        (share, least), the keyword side leaves out the terms that share of the scopes'
        entries hold, once they have received `least` (`_ranking.keyword_candidates`).
        """
        found = await self._scopes(scopes)
        if not found or k <= 0:
            return []
        rows = [f.scope for f in found]
        pool = max(k * 4, pool, head)
        q = unit(query_vector, self.dim)[0]
        # Two read connections, two threads: SQLite releases the GIL, so both sides overlap.
        vec, kw = await asyncio.gather(
            ranking.vector_candidates(self._reader, rows, q, pool, kinds),
            ranking.keyword_candidates(self._keyword_reader, rows, query_text, pool, kinds, common),
        )
        best, fused = ranking.fuse(vec, kw, k, head=head, keyword_weight=keyword_weight)
        return await self._hits(found, best, fused, vec, kw)

    async def vector_search(
        self,
        scopes: Iterable[Scope],
        *,
        query_vector: npt.ArrayLike,
        k: int = 10,
        kinds: Collection[str] | None = None,
    ) -> list[Hit]:
        """Vector-only search (score: cosine similarity), for comparison."""
        found = await self._scopes(scopes)
        if not found or k <= 0:
            return []
        q = unit(query_vector, self.dim)[0]
        vec = (
            await ranking.vector_candidates(self._reader, [f.scope for f in found], q, k, kinds)
        )[:k]
        return await self._hits(found, [r for r, _ in vec], dict(vec), vec, [])

    async def keyword_search(
        self,
        scopes: Iterable[Scope],
        *,
        query_text: str,
        k: int = 10,
        kinds: Collection[str] | None = None,
        common: tuple[float, int] | None = None,
    ) -> list[Hit]:
        """Keyword-only search (score: BM25), for comparison; `common` as for `search`."""
        found = await self._scopes(scopes)
        if not found or k <= 0:
            return []
        kw = (
            await ranking.keyword_candidates(
                self._keyword_reader, [f.scope for f in found], query_text, k, kinds, common
            )
        )[:k]
        return await self._hits(found, [r for r, _ in kw], dict(kw), [], kw)

    async def common_terms(
        self, scopes: Iterable[Scope], text: str, *, share: float, least: int
    ) -> set[str]:
        """The words of `text` (as `fts_terms` reads them) that at least `share` of the
        entries of these scopes hold: words that tell none of them apart. None while the
        scopes have received fewer than `least` entries, too few for the share to say so."""
        rows = [f.scope for f in await self._scopes(scopes)]
        total = sum(r.size for r in rows)
        terms = fts_terms(text)
        if not terms or total < max(1, least):
            return set()
        df = await ranking.term_counts(self._keyword_reader, rows, terms)
        return {t for t, n in df.items() if n >= share * total}

    async def similarities(
        self, scope: Scope, ids: Collection[str], query_vector: npt.ArrayLike
    ) -> dict[str, float]:
        """Cosine of the query to each stored entry of `scope` with these ids."""
        found = await self._scopes([scope])
        if not found or not ids:
            return {}
        lo, hi = sql.bounds(found[0].scope.id)
        q = unit(query_vector, self.dim)[0]
        sims: dict[str, float] = {}
        for part in sql.chunks(sorted(ids)):
            rows = await self._reader.execute_fetchall(
                "SELECT m.id, v.vector FROM memories m JOIN memory_vectors v ON v.rid = m.rid"
                f" WHERE m.id IN ({sql.marks(len(part))}) AND m.rid BETWEEN ? AND ?",
                (*part, lo, hi),
            )
            for entry_id, blob in rows:
                sims[str(entry_id)] = float(np.frombuffer(bytes(blob), dtype=np.float32) @ q)
        return sims

    async def dump(self) -> list[tuple[Any, ...]]:
        """Every entry as a canonical tuple (no rowids or insertion order), sorted:
        scope kind, space, owner, id, source, kind, role, text, source_seq, created_at,
        the vector's sha256, the sign bits in hex."""
        bits = {
            int(r[0]): bytes(r[1])
            for table, _ in sql.VEC_TABLES
            for r in await self._reader.execute_fetchall(f"SELECT rowid, bits FROM {table}")
        }
        rows = await self._reader.execute_fetchall(
            "SELECT m.rid, s.kind, s.space, s.owner, m.id, m.source, m.kind, m.role, m.text,"
            " m.source_seq, m.created_at, v.vector FROM memories m"
            " JOIN memory_scopes s ON s.scope = m.rid >> 32"
            " JOIN memory_vectors v ON v.rid = m.rid"
        )
        out = [
            (*r[1:11], hashlib.sha256(bytes(r[11])).hexdigest(), bits.get(int(r[0]), b"").hex())
            for r in rows
        ]
        return sorted(out, key=repr)

    async def verify(self) -> None:
        """Raise HybridIndexError unless entries, vectors, vec0 and FTS5 agree."""
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
            raise HybridIndexError(f"row counts disagree (entries, vectors, vec0, fts): {counts}")
        async with self._write_lock:
            try:
                await self._writer.execute(
                    "INSERT INTO memory_fts (memory_fts, rank) VALUES ('integrity-check', 1)"
                )
            except _sqlite.DatabaseError as exc:
                raise HybridIndexError(f"FTS5 index disagrees with the entries: {exc}") from exc

    # -- internals --------------------------------------------------------

    def _transaction(self) -> Transaction:
        return Transaction(self._writer)

    async def _delete(
        self,
        selects: Sequence[tuple[str, Sequence[Any]]],
        *,
        scrub: bool,
        forget: tuple[str, str] | None = None,
    ) -> int:
        """Delete the (rid, text) rows these queries find; with `forget`, record that
        (space, source) as deleted in the same transaction."""
        found: list[tuple[int, str]] = []
        async with self._write_lock:
            async with self._transaction() as db:
                for select, args in selects:
                    rows = await db.execute_fetchall(select, args)
                    found.extend((int(r[0]), str(r[1])) for r in rows)
                await sql.delete_rows(db, found)
                if forget is not None:
                    await db.execute(
                        "INSERT INTO memory_forgotten (key) VALUES (?)"
                        " ON CONFLICT (key) DO NOTHING",
                        (sql.forgotten_key(*forget),),
                    )
            await (self._scrub_file() if scrub else self._truncate_wal())
        return len(found)

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
        raise HybridIndexError("deleted, but the WAL could not be truncated (readers busy)")

    async def _scopes(self, keys: Iterable[Scope]) -> list[_Found]:
        """The stored ones of these scopes, by id."""
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return []
        rows = await self._reader.execute_fetchall(
            "SELECT scope, tier, next_seq, kind, space, owner FROM memory_scopes"
            f" WHERE (kind, space, owner) IN (VALUES {','.join(['(?,?,?)'] * len(wanted))})"
            " ORDER BY scope",
            [v for key in wanted for v in key],
        )
        return [
            _Found(
                ScopeRow(int(r[0]), int(r[1]), int(r[2])), Scope(str(r[3]), str(r[4]), str(r[5]))
            )
            for r in rows
        ]

    async def _hits(
        self,
        found: list[_Found],
        order: list[int],
        scores: dict[int, float],
        vec: list[tuple[int, float]],
        kw: list[tuple[int, float]],
    ) -> list[Hit]:
        if not order:
            return []
        vrank = {rid: (rank, sim) for rank, (rid, sim) in enumerate(vec, 1)}
        krank = {rid: (rank, bm) for rank, (rid, bm) in enumerate(kw, 1)}
        rows = await self._reader.execute_fetchall(
            f"SELECT {_rows.COLUMNS} FROM memories WHERE rid IN ({sql.marks(len(order))})", order
        )
        by_rid = {int(r[0]): r for r in rows}
        # The scope is checked again on each row's own rowid, not only by partition.
        key_of = {f.scope.id: f.key for f in found}
        hits: list[Hit] = []
        for rid in order:
            r = by_rid.get(rid)
            key = key_of.get(rid >> sql.SCOPE_SHIFT)
            if r is None or key is None:
                continue
            v, kk = vrank.get(rid), krank.get(rid)
            hits.append(
                Hit(
                    scope=key,
                    id=r[1],
                    source=r[2],
                    kind=r[3],
                    role=r[4],
                    text=r[5],
                    source_seq=int(r[6]),
                    created_at=datetime.fromisoformat(r[7]),
                    score=scores[rid],
                    vector_rank=v[0] if v else None,
                    vector_similarity=v[1] if v else None,
                    keyword_rank=kk[0] if kk else None,
                    bm25=kk[1] if kk else None,
                )
            )
        return hits
