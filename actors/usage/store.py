"""The usage ledger's file: rows of sums per day and dimensions, and the log position
they include, in SQLite (the driver and pragmas of the search indexes).

Rows and position are written in one transaction, and a batch at or before the
stored position is skipped: replaying the log never counts an event twice. Writes go
through one connection; reports and spend totals through read-only ones of their own
(WAL), so a budget check never waits behind a long report or a write.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import aiosqlite

from actors.search.connection import Transaction, connect
from actors.usage.ledger import NANO, Delta, RowKey
from contracts.usage import Spend, SpendQuery, UsageGroup, UsageQuery, UsageReport, UsageRow

__all__ = ["UsageStore"]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS usage_rows (
        day TEXT NOT NULL, tenant TEXT NOT NULL, key_id TEXT NOT NULL, user_id TEXT NOT NULL,
        model TEXT NOT NULL, pipeline TEXT NOT NULL, engine TEXT NOT NULL,
        upstream_model TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        cost_nusd INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (day, tenant, key_id, user_id, model, pipeline, engine, upstream_model)
    ) WITHOUT ROWID""",
    # Budget checks: a tenant's, or one key's, rows since a day.
    "CREATE INDEX IF NOT EXISTS usage_by_key ON usage_rows (tenant, key_id, day)",
    "CREATE TABLE IF NOT EXISTS usage_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)
_KEY = ("day", "tenant", "key_id", "user_id", "model", "pipeline", "engine", "upstream_model")
_UPSERT = f"""
    INSERT INTO usage_rows ({", ".join(_KEY)},
                            requests, prompt_tokens, completion_tokens, cost_nusd)
    VALUES ({", ".join("?" * (len(_KEY) + 4))})
    ON CONFLICT ({", ".join(_KEY)}) DO UPDATE SET
        requests = requests + excluded.requests,
        prompt_tokens = prompt_tokens + excluded.prompt_tokens,
        completion_tokens = completion_tokens + excluded.completion_tokens,
        cost_nusd = cost_nusd + excluded.cost_nusd
"""
# The column each grouping reads, and the UsageRow field it fills.
_COLUMNS: dict[UsageGroup, tuple[str, str]] = {
    "day": ("day", "day"),
    "tenant": ("tenant", "tenant"),
    "key": ("key_id", "key_id"),
    "user": ("user_id", "user"),
    "model": ("model", "model"),
    "pipeline": ("pipeline", "pipeline"),
    "engine": ("engine", "engine"),
    "upstream_model": ("upstream_model", "upstream_model"),
}


def _summed(deltas: Sequence[Delta]) -> dict[RowKey, list[int]]:
    sums: dict[RowKey, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for delta in deltas:
        total = sums[delta.row]
        total[0] += delta.requests
        total[1] += delta.prompt_tokens
        total[2] += delta.completion_tokens
        total[3] += delta.cost_nusd
    return sums


def _filters(
    tenant: str | None,
    key_id: str | None,
    user: str | None,
    since: date | None,
    until: date | None,
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    for column, value in (("tenant", tenant), ("key_id", key_id), ("user_id", user)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    if since is not None:
        clauses.append("day >= ?")
        args.append(since.isoformat())
    if until is not None:
        clauses.append("day <= ?")
        args.append(until.isoformat())
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


class UsageStore:
    def __init__(
        self,
        writer: aiosqlite.Connection,
        reports: aiosqlite.Connection,
        spends: aiosqlite.Connection,
    ) -> None:
        self._writer = writer
        self._reports = reports
        self._spends = spends
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path) -> UsageStore:
        """Open (creating if needed) the ledger file at `path`."""
        name = str(path)
        writer = await connect(name, reader=False)
        readers: list[aiosqlite.Connection] = []
        try:
            await writer.execute("PRAGMA journal_mode = WAL")
            for statement in _SCHEMA:
                await writer.execute(statement)
            for _ in range(2):
                readers.append(await connect(name, reader=True))
        except BaseException:
            for db in (writer, *readers):
                await db.close()
            raise
        return cls(writer, *readers)

    async def close(self) -> None:
        for db in (self._reports, self._spends, self._writer):
            await db.close()

    # -- writing ------------------------------------------------------------

    async def add(self, deltas: Sequence[Delta], *, checkpoint: int) -> bool:
        """Add the deltas of the log up to `checkpoint`, with it, atomically; False (and
        nothing added) when the ledger already holds that position."""
        async with self._lock, Transaction(self._writer) as db:
            if checkpoint <= await self._checkpoint(db):
                return False
            await db.executemany(
                _UPSERT,
                [(row.day.isoformat(), *row[1:], *sums) for row, sums in _summed(deltas).items()],
            )
            await db.execute(
                "INSERT INTO usage_meta (name, value) VALUES ('checkpoint', ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (checkpoint,),
            )
            return True

    async def reset(self) -> None:
        """Drop every row and the position, for a rebuild from the log."""
        async with self._lock, Transaction(self._writer) as db:
            await db.execute("DELETE FROM usage_rows")
            await db.execute("DELETE FROM usage_meta")

    # -- reading ------------------------------------------------------------

    async def checkpoint(self) -> int:
        """The last log position the rows include (0 when none)."""
        return await self._checkpoint(self._spends)

    @staticmethod
    async def _checkpoint(db: aiosqlite.Connection) -> int:
        async with db.execute("SELECT value FROM usage_meta WHERE name = 'checkpoint'") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def report(self, query: UsageQuery) -> UsageReport:
        groups = list(dict.fromkeys(query.group_by))
        columns = [_COLUMNS[g][0] for g in groups]
        where, args = _filters(query.tenant, query.key_id, query.user, query.since, query.until)
        select = ", ".join(
            [
                *columns,
                "SUM(requests)",
                "SUM(prompt_tokens)",
                "SUM(completion_tokens)",
                "SUM(cost_nusd)",
            ]
        )
        grouping = f" GROUP BY {', '.join(columns)} ORDER BY {', '.join(columns)}" if groups else ""
        sql = f"SELECT {select} FROM usage_rows{where}{grouping} LIMIT ?"
        async with self._reports.execute(sql, (*args, query.limit + 1)) as cur:
            found = list(await cur.fetchall())
        rows = []
        for values in found[: query.limit]:
            requests, prompt, completion, nusd = values[len(groups) :]
            if requests is None:
                continue  # no row matched: SUM over nothing
            fields: dict[str, Any] = {
                _COLUMNS[g][1]: _value(g, v) for g, v in zip(groups, values, strict=False)
            }
            rows.append(
                UsageRow(
                    **fields,
                    requests=requests,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    cost_usd=nusd / NANO,
                )
            )
        return UsageReport(
            rows=rows, truncated=len(found) > query.limit, applied_seq=await self.checkpoint()
        )

    async def spend(self, query: SpendQuery) -> Spend:
        where, args = _filters(query.tenant, query.key_id, None, query.since, None)
        sql = (
            "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0), "
            f"COALESCE(SUM(cost_nusd), 0) FROM usage_rows{where}"
        )
        async with self._spends.execute(sql, args) as cur:
            row = await cur.fetchone()
        assert row is not None
        return Spend(tokens=int(row[0]), cost_usd=int(row[1]) / NANO)

    async def dump(self) -> list[tuple[Any, ...]]:
        """Every row, sorted: the ledger's content, to compare a rebuild with."""
        async with self._reports.execute(
            f"SELECT * FROM usage_rows ORDER BY {', '.join(_KEY)}"
        ) as cur:
            return [tuple(row) for row in await cur.fetchall()]


def _value(group: UsageGroup, value: str) -> Any:
    if group == "day":
        return date.fromisoformat(value)
    if group == "user":
        return value or None
    return value
