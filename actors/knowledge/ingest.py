"""The shell of ingestion: files on disk -> decisions -> events appended -> index.

The decision is taken against the collection's log (folded with `documents`),
not against the index, and appended with the collection's expected last seq:
two ingestions of one collection at once make one of them fail, never a mix.

Removal semantics. A changed file is one DocumentRemoved of its old version then
DocumentAdded of the new. A file that was ingested from a folder given again
and is no longer in it (or no longer readable as a document) is removed. A path
given explicitly that no longer exists is removed if the collection holds it,
and is an error otherwise. Nothing else is removed implicitly: a folder not
named in this call keeps its documents. `remove` takes files or folders.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import msgspec
from nats.aio.client import Client

from actors.knowledge.chunk import Chunk, chunk_sections
from actors.knowledge.index import CollectionInfo, KnowledgeIndex
from actors.knowledge.log import KnowledgeLog
from actors.knowledge.parse import SUFFIXES, page_count, parse
from bus.subjects import validate_id
from eventstore.knowledge import (
    ChunkData,
    DocumentAdded,
    DocumentRemoved,
    KbEvent,
    Position,
    documents,
)


class Progress(Protocol):
    """Reports a long ingestion (the CLI draws a bar)."""

    def update(self, done: int, records: int, final: bool = False) -> None: ...


__all__ = [
    "EVENT_TEXT_BUDGET",
    "Progress",
    "Report",
    "collections",
    "document_events",
    "ingest",
    "remove",
]

#: Characters of chunk text per DocumentAdded event (NATS payloads are bounded).
EVENT_TEXT_BUDGET = 256_000


class Report(msgspec.Struct, kw_only=True):
    """What an ingestion did, by path."""

    added: list[str] = msgspec.field(default_factory=list)
    updated: list[str] = msgspec.field(default_factory=list)
    unchanged: list[str] = msgspec.field(default_factory=list)
    removed: list[str] = msgspec.field(default_factory=list)
    failed: list[tuple[str, str]] = msgspec.field(default_factory=list)
    chunks: int = 0  # chunks of added and updated documents
    pages: int = 0


def document_events(
    collection: str, path: str, data: bytes, chunks: Sequence[Chunk], *, pages: int, at: datetime
) -> list[DocumentAdded]:
    """DocumentAdded events of one document, split to stay under EVENT_TEXT_BUDGET each."""
    sha = hashlib.sha256(data).hexdigest()
    items = [
        ChunkData(text=c.text, position=Position(offset=c.offset, page=c.page), heading=c.heading)
        for c in chunks
    ]
    parts: list[list[ChunkData]] = [[]]
    size = 0
    for item in items:
        if parts[-1] and size + len(item.text) > EVENT_TEXT_BUDGET:
            parts.append([])
            size = 0
        parts[-1].append(item)
        size += len(item.text)
    out: list[DocumentAdded] = []
    first = 0
    for part in parts:
        out.append(
            DocumentAdded(
                collection=collection,
                path=path,
                sha256=sha,
                chunks=tuple(part),
                at=at,
                first=first,
                total=len(items),
                pages=pages,
                size=len(data),
            )
        )
        first += len(part)
    return out


def _walk(folder: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in SUFFIXES:
                yield Path(root) / name


def _under(path: str, folder: Path) -> bool:
    return Path(path).is_relative_to(folder)


async def _load(
    nc: Client, index: KnowledgeIndex, collection: str
) -> tuple[KnowledgeLog, dict[str, str], int]:
    """The log, the collection's documents per the log and its last seq; the index caught up."""
    validate_id(collection, "collection name")
    log = KnowledgeLog.of(nc)
    await log.ensure()
    events = await log.read(collection)
    checkpoint = await index.checkpoint(collection)
    await index.apply([(s, e) for s, e in events if s > checkpoint])
    return log, documents(e for _, e in events), (events[-1][0] if events else 0)


async def ingest(
    nc: Client,
    index: KnowledgeIndex,
    collection: str,
    paths: Sequence[str | Path],
    *,
    progress: Callable[[int], Progress] | None = None,
) -> Report:
    """Add or update the documents at `paths` (files or folders) in `collection`;
    `progress`, given the number of files, makes what reports how far it got."""
    log, state, last = await _load(nc, index, collection)
    files: list[Path] = []
    gone: list[str] = []
    folders: list[Path] = []
    for given in paths:
        p = Path(given).expanduser().resolve()
        if p.is_dir():
            folders.append(p)
            files.extend(_walk(p))
        elif p.is_file():
            files.append(p)
        elif str(p) in state:
            gone.append(str(p))
        else:
            raise FileNotFoundError(f"no such file or folder: {given}")
    files = list(dict.fromkeys(files))
    seen = {str(f) for f in files}
    gone += [
        p for p in state if p not in seen and p not in gone and any(_under(p, d) for d in folders)
    ]

    report = Report()
    bar = progress(len(files) + len(gone)) if progress is not None else None

    async def commit(events: list[KbEvent]) -> None:
        nonlocal last
        seqs = await log.append(collection, events, expected_last_seq=last)
        last = seqs[-1]
        await index.apply(list(zip(seqs, events, strict=True)))

    for done, file in enumerate(files, 1):
        path = str(file)
        try:
            data = file.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            if state.get(path) == sha:
                report.unchanged.append(path)
                if bar is not None:
                    bar.update(done, report.chunks)
                continue
            sections = parse(file, data)
            chunks = chunk_sections(sections)
        except Exception as e:  # noqa: BLE001 (a corrupt file must not stop the others)
            report.failed.append((path, f"{type(e).__name__}: {e}"))
            if bar is not None:
                bar.update(done, report.chunks)
            continue
        now = datetime.now(UTC)
        pages = page_count(sections)
        events: list[KbEvent] = []
        if path in state:
            events.append(
                DocumentRemoved(collection=collection, path=path, sha256=state[path], at=now)
            )
            report.updated.append(path)
        else:
            report.added.append(path)
        events.extend(document_events(collection, path, data, chunks, pages=pages, at=now))
        await commit(events)
        state[path] = sha
        report.chunks += len(chunks)
        report.pages += pages
        # Counted once its chunks are embedded and stored, not when it is read.
        if bar is not None:
            bar.update(done, report.chunks)
    for path in gone:
        now = datetime.now(UTC)
        await commit(
            [DocumentRemoved(collection=collection, path=path, sha256=state.pop(path), at=now)]
        )
        report.removed.append(path)
    if bar is not None:
        bar.update(len(files) + len(gone), report.chunks, final=True)
    return report


async def remove(
    nc: Client,
    index: KnowledgeIndex,
    collection: str,
    paths: Sequence[str | Path],
    *,
    scrub: bool = True,
) -> Report:
    """Remove the documents at `paths` (a file, or every document under a folder).

    With `scrub` the index file is rewritten so no removed text survives in it.
    """
    log, state, last = await _load(nc, index, collection)
    targets = [Path(p).expanduser().resolve() for p in paths]
    doomed = [p for p in state if any(p == str(t) or _under(p, t) for t in targets)]
    now = datetime.now(UTC)
    events: list[KbEvent] = [
        DocumentRemoved(collection=collection, path=p, sha256=state[p], at=now) for p in doomed
    ]
    if events:
        seqs = await log.append(collection, events, expected_last_seq=last)
        await index.apply(list(zip(seqs, events, strict=True)))
        if scrub:
            await index.scrub()
    return Report(removed=doomed)


async def collections(nc: Client) -> list[CollectionInfo]:
    """Every collection with documents, by name, as the log has them."""
    log = KnowledgeLog.of(nc)
    await log.ensure()
    docs: dict[str, dict[str, str]] = {}
    chunks: dict[tuple[str, str], int] = {}
    events = [e for _, e in await log.read()]
    for name in {e.collection for e in events}:
        docs[name] = documents(e for e in events if e.collection == name)
    for e in events:
        if isinstance(e, DocumentAdded):
            chunks[(e.collection, e.sha256)] = e.total or len(e.chunks)
    return [
        CollectionInfo(
            name=name,
            documents=len(docs[name]),
            chunks=sum(chunks[(name, sha)] for sha in set(docs[name].values())),
        )
        for name in sorted(docs)
        if docs[name]
    ]
