"""Starting the usage actor where it belongs: one per ledger file, whoever gets there first;
and the ledger without a server (`veil usage` with none running, `veil usage --rebuild`).

Every worker with a data directory of its own keeps a whole ledger (each is the same
projection of the same log) and answers queries from it; workers that share one take
turns through the file's lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from actors.usage.actor import UsageActor
from actors.usage.projector import UsageProjector, prices_of
from actors.usage.store import UsageStore
from bus.connection import connect
from bus.stream_reader import StreamReader
from bus.subjects import EVENTS_STREAM, EVENTS_WILDCARD
from config import Config
from contracts.usage import UsageQuery, UsageReport
from eventstore.jetstream import JetStreamEventStore, ensure_stream
from eventstore.store import EventStore
from veil import __version__

__all__ = [
    "UsageHandle",
    "ledger_path",
    "lock_ledger",
    "offline_report",
    "rebuild_ledger",
    "start_usage",
]

# Events applied per transaction when the ledger catches up without a server.
BATCH = 512

log = structlog.get_logger("veil.usage")


def ledger_path(config: Config) -> Path:
    return Path(config.usage.path) if config.usage.path else Path(config.data_dir) / "usage.db"


def lock_ledger(config: Config) -> int | None:
    """Take the ledger's lock: the open lock file to keep while writing the ledger, or None
    when another process holds it."""
    path = ledger_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path) + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class UsageHandle:
    """A running usage actor with its ledger and the lock that makes it the only one."""

    def __init__(self, actor: UsageActor, store: UsageStore, lock_fd: int) -> None:
        self.actor = actor
        self.store = store
        self._lock_fd = lock_fd

    async def stop(self) -> None:
        await self.actor.stop()
        await self.store.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


async def start_usage(
    config: Config, nc: Client, js: JetStreamContext, events: EventStore
) -> UsageHandle | None:
    """Start the usage actor on the ledger file, unless another process already owns it."""
    fd = lock_ledger(config)
    if fd is None:
        log.info("usage.elsewhere", path=str(ledger_path(config)))
        return None
    try:
        store = await UsageStore.open(ledger_path(config))
    except BaseException:
        os.close(fd)
        raise
    actor = UsageActor(
        nc, js, UsageProjector(store, events, prices_of(config)), version=__version__
    )
    try:
        await actor.start()
    except BaseException:
        await store.close()
        os.close(fd)
        raise
    return UsageHandle(actor, store, fd)


async def _catch_up(js: JetStreamContext, projector: UsageProjector) -> int:
    """Apply the log past the ledger's position, up to its end now; the events read."""
    start = await projector.store.checkpoint() + 1
    last = (await js.stream_info(EVENTS_STREAM)).state.last_seq
    if last < start:
        return 0
    done = 0
    async with StreamReader(js, EVENTS_WILDCARD, start_seq=start, batch=BATCH, wait=0) as reader:
        while True:
            batch = await reader.next_batch(timeout=5)
            if not batch:
                break
            await projector.apply_messages(batch)
            done += len(batch)
            if batch[-1].metadata.sequence.stream >= last:
                break
    return done


@contextlib.asynccontextmanager
async def _offline(
    config: Config, nc: Client, *, reset: bool
) -> AsyncIterator[tuple[UsageStore, int]]:
    """The ledger, opened by this process (no server may hold it) and brought up to the
    log: the store and the events read."""
    fd = lock_ledger(config)
    if fd is None:
        raise SystemExit(
            f"{ledger_path(config)} is in use by a running Veil: stop it first "
            "(or query it while it runs)"
        )
    try:
        store = await UsageStore.open(ledger_path(config))
        try:
            if reset:
                await store.reset()
            js = nc.jetstream()
            await ensure_stream(js)
            projector = UsageProjector(store, JetStreamEventStore(js, nc), prices_of(config))
            yield store, await _catch_up(js, projector)
        finally:
            await store.close()
    finally:
        os.close(fd)


async def offline_report(config: Config, nc: Client, query: UsageQuery) -> UsageReport:
    """A report from the ledger file, brought up to the log first (no server runs)."""
    async with _offline(config, nc, reset=False) as (store, _):
        return await store.report(query)


async def rebuild_ledger(config: Config, url: str) -> tuple[int, int]:
    """Drop the ledger's rows and count the whole log again: (events read, rows)."""
    nc = await connect(url, name="veil-usage")
    try:
        async with _offline(config, nc, reset=True) as (store, events):
            return events, len(await store.dump())
    finally:
        await nc.drain()
