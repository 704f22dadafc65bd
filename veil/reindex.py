"""`veil reindex`: drop the memory index and rebuild it from the log, with a progress bar."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from actors.memory.embedder import default_embedder
from actors.memory.index import MemoryIndex
from actors.memory.projector import Projector
from bus.connection import connect
from bus.stream_reader import StreamReader
from bus.subjects import EVENTS_STREAM, EVENTS_WILDCARD
from config import Config
from eventstore.jetstream import JetStreamEventStore, ensure_stream
from eventstore.tombstones import TombstoneLog
from veil.memory_role import index_path, lock_indexes
from veil.progress import ProgressBar

__all__ = ["reindex"]

BATCH = 256


async def reindex(config: Config, url: str, out: TextIO = sys.stderr) -> tuple[int, int]:
    """Rebuild the memory index from CHAT_EVENTS; returns (events read, memories stored)."""
    path = index_path(config)
    fd = lock_indexes(config)
    if fd is None:
        raise SystemExit(f"{path} is in use by a running Veil: stop it first, then reindex")
    nc = await connect(url, name="veil-reindex")
    embedder = default_embedder()
    index = await MemoryIndex.open(path, model=embedder.model_id)
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        store = JetStreamEventStore(js, nc)
        projector = Projector(index, embedder, store)
        for tombstone in await TombstoneLog(js, nc).all():
            # Recorded in the index, which then refuses the session's records for good.
            await index.delete_session(tombstone.tenant, tombstone.session_id, scrub=False)
        await index.reset()  # keeps those records, and rewrites the file
        last = (await js.stream_info(EVENTS_STREAM)).state.last_seq
        bar = ProgressBar(last, out)
        done = records = 0
        if last:
            async with StreamReader(js, EVENTS_WILDCARD, batch=BATCH, wait=0) as reader:
                while done < last:
                    batch = await reader.next_batch(timeout=5)
                    if not batch:
                        break
                    records += await projector.apply_messages(batch)
                    done = batch[-1].metadata.sequence.stream
                    bar.update(done, records)
        bar.update(last, records, final=True)
        return done, records
    finally:
        await index.close()
        await nc.drain()
        os.close(fd)
