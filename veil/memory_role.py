"""Starting the memory actor where it belongs: one per index file, whoever gets there first."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import structlog
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from actors.knowledge.actor import KnowledgeActor
from actors.knowledge.index import KnowledgeIndex
from actors.memory.actor import MemoryActor
from actors.memory.embedder import Embedder, default_embedder
from actors.memory.index import MemoryIndex
from config import Config
from eventstore.store import EventStore
from eventstore.tombstones import TombstoneLog
from veil import __version__

__all__ = ["MemoryHandle", "index_path", "lock_indexes", "start_memory"]

log = structlog.get_logger("veil.memory")


def index_path(config: Config) -> Path:
    return (
        Path(config.memory.path) if config.memory.path else Path(config.data_dir) / "memory.sqlite"
    )


def lock_indexes(config: Config) -> int | None:
    """Take the data directory's index lock (memory and knowledge indexes share it): the
    open lock file to keep while writing them, or None when another process holds it."""
    path = index_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path) + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class MemoryHandle:
    """A running memory actor with its index and the lock that makes it the only one."""

    def __init__(
        self,
        actor: MemoryActor | None,
        index: MemoryIndex | None,
        knowledge: KnowledgeActor,
        knowledge_index: KnowledgeIndex,
        lock_fd: int,
    ) -> None:
        self.actor = actor
        self._index = index
        self._knowledge = knowledge
        self._knowledge_index = knowledge_index
        self._lock_fd = lock_fd

    async def stop(self) -> None:
        if self.actor is not None:
            await self.actor.stop()
        await self._knowledge.stop()
        if self._index is not None:
            await self._index.close()
        await self._knowledge_index.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


async def start_memory(
    config: Config, nc: Client, js: JetStreamContext, store: EventStore, tombstones: TombstoneLog
) -> MemoryHandle | None:
    """Start the memory actor (when enabled) and the knowledge actor, unless another
    process already owns the data directory's indexes."""
    path = index_path(config)
    fd = lock_indexes(config)
    if fd is None:
        log.info("memory.elsewhere", path=str(path))
        return None
    index: MemoryIndex | None = None
    actor: MemoryActor | None = None
    if config.memory.enabled:
        embedder = default_embedder()
        # Opened with another model's vectors, the index empties itself and the actor
        # follows the log from its start: the rebuild runs in the background.
        index = await MemoryIndex.open(path, model=embedder.model_id)
        actor = MemoryActor(
            nc,
            js,
            index,
            embedder,
            # Background work: niced, so it takes the CPU the turns leave.
            projection_embedder=Embedder(nice=10),
            store=store,
            tombstones=tombstones,
            version=__version__,
            max_lag=config.memory.max_lag,
        )
        await actor.start()
    # The knowledge index lives beside the memory index, under the same lock.
    knowledge_index = await KnowledgeIndex.open(
        path.parent / "knowledge.sqlite", embedder=default_embedder()
    )
    knowledge = KnowledgeActor(
        nc, knowledge_index, version=__version__, uploads=path.parent / "kb-uploads"
    )
    await knowledge.start()
    return MemoryHandle(actor, index, knowledge, knowledge_index, fd)
