"""`veil kb`: add, list, remove and reindex knowledge collections."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

from nats.aio.client import Client

from actors.knowledge.index import KnowledgeIndex
from actors.knowledge.ingest import Report, collections, ingest, remove
from actors.knowledge.log import KnowledgeLog
from actors.memory.embedder import default_embedder
from bus.connection import connect
from bus.subjects import is_valid_id
from config import Config
from veil.memory_role import index_path, lock_indexes
from veil.progress import ProgressBar

__all__ = ["kb_main"]


@contextlib.asynccontextmanager
async def _index(config: Config) -> AsyncIterator[KnowledgeIndex]:
    """The data directory's knowledge index, or a scratch one while a running Veil owns it.

    A running Veil catches its own index up from KB_EVENTS before each search,
    so what is added here is found there either way.
    """
    fd = lock_indexes(config)
    scratch = None
    if fd is not None:
        path = index_path(config).parent / "knowledge.sqlite"
    else:
        scratch = tempfile.TemporaryDirectory(prefix="veil-kb-")
        path = Path(scratch.name) / "knowledge.sqlite"
    index = await KnowledgeIndex.open(path, embedder=default_embedder())
    try:
        yield index
    finally:
        await index.close()
        if fd is not None:
            os.close(fd)
        if scratch is not None:
            scratch.cleanup()


def _print_report(report: Report) -> None:
    for label, paths in (
        ("added", report.added),
        ("updated", report.updated),
        ("removed", report.removed),
    ):
        for path in paths:
            print(f"{label:9} {path}")
    for path, why in report.failed:
        print(f"{'failed':9} {path}: {why}")
    print(
        f"{len(report.added)} added, {len(report.updated)} updated, {len(report.unchanged)} unchanged, "
        f"{len(report.removed)} removed, {len(report.failed)} failed; {report.chunks} chunks"
    )


async def _run(
    nc: Client, config: Config, action: str, collection: str | None, paths: list[str]
) -> int:
    log = KnowledgeLog.of(nc)
    await log.ensure()
    if action == "ls" and collection is None:
        print(f"{'COLLECTION':32} {'DOCUMENTS':>9} {'CHUNKS':>7}")
        for info in await collections(nc):
            print(f"{info.name:32} {info.documents:>9} {info.chunks:>7}")
        return 0
    assert collection is not None
    async with _index(config) as index:
        if action == "add":
            bar = partial(
                ProgressBar, out=sys.stderr, unit="files", made="chunks", rate_of_made=True
            )
            _print_report(await ingest(nc, index, collection, paths, progress=bar))
        elif action == "rm":
            _print_report(await remove(nc, index, collection, paths))
        elif action == "ls":
            await index.sync(log, collection)
            for doc in await index.documents(collection):
                print(f"{doc.path}  {doc.sha256[:12]}  {doc.chunks} chunks")
        elif action == "reindex":
            count = await index.rebuild(log)
            print(f"Rebuilt the knowledge index from {count} events.")
    return 0


async def kb_main(
    config: Config, url: str, action: str, collection: str | None, paths: list[str]
) -> int:
    if collection is not None and not is_valid_id(collection):
        print(
            f"invalid collection name {collection!r}: use 1-128 characters from A-Za-z0-9_-",
            file=sys.stderr,
        )
        return 2
    nc = await connect(url, name="veil-kb")
    try:
        return await _run(nc, config, action, collection, paths)
    except FileNotFoundError as error:
        print(f"veil kb: {error}", file=sys.stderr)
        return 1
    finally:
        await nc.drain()
