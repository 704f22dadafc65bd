"""Connections to an index file: sqlite-vec loaded, the pragmas the index relies on,
and write transactions. An owner of a hybrid index may keep tables of its own in the
same file (WAL) through a connection of its own (the knowledge index does).
"""

from __future__ import annotations

import sqlite3
from typing import cast

import aiosqlite
import pysqlite3.dbapi2 as sqlite  # type: ignore[import-untyped]
import sqlite_vec  # type: ignore[import-untyped]

__all__ = ["CACHE_KIB", "Transaction", "connect"]

# Page cache per connection: SQLite's own default. The file's pages stay in the OS page
# cache anyway: a 100k scope searched p50 8.3 ms with 32 MiB a connection and 8.6 ms with
# 2 MiB (bench/memory_query_latency.py), while ten connections of 32 MiB let a memory
# process grow by 320 MiB as its indexes grow.
CACHE_KIB = 2048


async def connect(path: str, *, reader: bool) -> aiosqlite.Connection:
    """A connection to the file at `path`; with `reader`, a read-only one."""

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
        f"cache_size = -{CACHE_KIB}",
        "synchronous = NORMAL",
    ):
        await db.execute(f"PRAGMA {pragma}")
    if reader:
        await db.execute("PRAGMA query_only = ON")
    return db


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
