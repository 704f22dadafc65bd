"""The memory actor: projects the event log into the memory index and answers recall.

One memory actor owns one index file. It follows CHAT_EVENTS from the position
stored in the index (committed with the rows it produced), so after a restart
it catches up; tombstones make it drop, and never re-add, a deleted session.
While turns keep the event loop busy, it waits, up to `memory.max_lag` seconds
behind the log (bus/loop_share.py).
Recall and forget are NATS micro service endpoints (`veil-memory`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from actors.memory.embedder import Embedder
from actors.memory.index import MemoryIndex
from actors.memory.projector import Projector
from bus import telemetry
from bus.codec import Codec, DecodeError
from bus.loop_share import LoopShare, give_way
from bus.requests import nats_request
from bus.service import Endpoint, TypedService, start_service
from bus.stream_reader import StreamReader
from bus.subjects import (
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    MEMORY_FORGET,
    MEMORY_RECALL,
    TOMBSTONES_WILDCARD,
)
from contracts.memory import (
    FORGET_CODEC,
    FORGOTTEN_CODEC,
    RECALL_CODEC,
    RECALL_REPLY_CODEC,
    ForgetRequest,
    Forgotten,
    MemoryHit,
    RecallReply,
    RecallRequest,
)
from eventstore.store import EventStore
from eventstore.tombstones import Tombstone, TombstoneLog

__all__ = [
    "MemoryActor",
    "ask_recall",
]

log = structlog.get_logger("veil.memory")

# Events applied per index transaction, and how long to wait to fill a batch.
BATCH = 256
BATCH_WAIT = 0.05


_TOMBSTONE_CODEC: Codec[Tombstone] = Codec(Tombstone)


async def ask_recall(nc: Client, ask: RecallRequest, timeout: float) -> list[MemoryHit]:
    """Recall through the memory actor; NATS and decode errors are the caller's to read."""
    reply = await nats_request(
        nc, MEMORY_RECALL, RECALL_CODEC.encode(ask), timeout=timeout, headers=telemetry.outgoing()
    )
    return RECALL_REPLY_CODEC.decode(reply.data).hits


async def ask_forget(nc: Client, forget: ForgetRequest, timeout: float) -> int:
    """Erase a session's memories through the memory actor; how many there were."""
    reply = await nats_request(
        nc,
        MEMORY_FORGET,
        FORGET_CODEC.encode(forget),
        timeout=timeout,
        headers=telemetry.outgoing(),
    )
    return FORGOTTEN_CODEC.decode(reply.data).deleted


class MemoryActor:
    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        index: MemoryIndex,
        embedder: Embedder,
        *,
        projection_embedder: Embedder | None = None,
        store: EventStore,
        tombstones: TombstoneLog,
        version: str,
        max_lag: float = 0.0,
        loop_share: LoopShare | None = None,
    ) -> None:
        self._nc = nc
        self._js = js
        self._index = index
        self._embedder = embedder
        self._store = store
        self._tombstones = tombstones
        self._version = version
        # Recall embeds on its own thread: queued behind the projection's batches,
        # a turn's query would wait for the previous turns' messages to be embedded.
        self._projector = Projector(index, projection_embedder or embedder, store)
        # While turns keep the event loop busy, indexing waits, up to this many
        # seconds behind the log (0: index at once).
        self._max_lag = max_lag
        self._loop_share = loop_share or LoopShare()
        self._progress = Progress()
        self._service: TypedService | None = None
        self._task: asyncio.Task[None] | None = None
        self._tombstone_sub: object | None = None
        self.caught_up = asyncio.Event()

    @property
    def index(self) -> MemoryIndex:
        return self._index

    async def start(self) -> None:
        for tombstone in await self._tombstones.all():
            await self._forget(tombstone.tenant, tombstone.session_id)
        self._tombstone_sub = await self._nc.subscribe(TOMBSTONES_WILDCARD, cb=self._on_tombstone)
        self._task = asyncio.create_task(self._follow(), name="memory-projector")
        recall = Endpoint(
            name="recall",
            subject=MEMORY_RECALL,
            request=RECALL_CODEC,
            reply=RECALL_REPLY_CODEC,
            handle=self._recall,
        )
        forget = Endpoint(
            name="forget",
            subject=MEMORY_FORGET,
            request=FORGET_CODEC,
            reply=FORGOTTEN_CODEC,
            handle=self._forget_request,
        )
        self._service = await start_service(
            self._nc,
            name="veil-memory",
            version=self._version,
            description="Long-term memory: hybrid recall over every session's messages",
            endpoints=[recall, forget],
            # `nats micro stats veil-memory --json`: how far indexing trails the log.
            stats_handler=lambda _endpoint: self.stats(),
        )

    def stats(self) -> dict[str, object]:
        """How far indexing trails the log (`Progress`), and how far it may."""
        return {**self._progress.stats(), "max_lag": self._max_lag}

    async def stop(self) -> None:
        if self._service is not None:
            await self._service.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- forgetting ---------------------------------------------------------

    async def _forget(self, tenant: str, session_id: str) -> int:
        self._projector.forget(tenant, session_id)
        # The index keeps the deletion and refuses the session's records from then on,
        # those of a batch the projection is embedding now included.
        return await self._index.delete_session(tenant, session_id)

    async def _on_tombstone(self, msg: Msg) -> None:
        with contextlib.suppress(DecodeError):
            tombstone = _TOMBSTONE_CODEC.decode(msg.data)
            await self._forget(tombstone.tenant, tombstone.session_id)

    async def _forget_request(self, forget: ForgetRequest) -> Forgotten:
        return Forgotten(deleted=await self._forget(forget.tenant, forget.session_id))

    # -- recall -------------------------------------------------------------

    async def _recall(self, ask: RecallRequest) -> RecallReply:
        # The GenAI conventions' memory search span.
        with telemetry.span("search_memory veil-memory", kind=telemetry.SpanKind.SERVER) as span:
            hits = await self.recall(ask)
            if span is not None:
                span.set_attributes(
                    {
                        "gen_ai.operation.name": "search_memory",
                        "gen_ai.provider.name": "veil",
                        "gen_ai.memory.store.name": "veil-memory",
                        "gen_ai.conversation.id": ask.session_id,
                        "veil.memory.mode": ask.mode,
                        "veil.memory.hits": len(hits),
                    }
                )
            return RecallReply(hits=hits, checkpoint=await self._index.checkpoint())

    async def recall(self, ask: RecallRequest) -> list[MemoryHit]:
        tenant, session_id, user_id = ask.tenant, ask.session_id, ask.user_id
        if ask.mode == "keyword":
            return await self._index.keyword_search(
                tenant=tenant, session_id=session_id, user_id=user_id, query_text=ask.query, k=ask.k
            )
        semantic = await self._index.semantic_query(
            tenant=tenant, session_id=session_id, user_id=user_id, query_text=ask.query
        )
        vector = (await self._embedder.aembed([semantic]))[0]
        if ask.mode == "vector":
            return await self._index.vector_search(
                tenant=tenant, session_id=session_id, user_id=user_id, query_vector=vector, k=ask.k
            )
        return await self._index.search(
            tenant=tenant,
            session_id=session_id,
            user_id=user_id,
            query_vector=vector,
            query_text=ask.query,
            k=ask.k,
        )

    # -- projection ---------------------------------------------------------

    async def _follow(self) -> None:
        """Apply the log from the checkpoint on, forever; retry after failures."""
        while True:
            try:
                await self._follow_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.exception("memory.projector_failed", error=repr(error))
                await asyncio.sleep(1.0)

    async def _follow_once(self) -> None:
        start = await self._index.checkpoint() + 1
        info = await self._js.stream_info(EVENTS_STREAM)
        if start > info.state.last_seq + 1:
            # The index is ahead of the log: the stream was recreated. Rebuild.
            log.warning(
                "memory.index_ahead_of_log", checkpoint=start - 1, last_seq=info.state.last_seq
            )
            await self._index.reset()
            start = 1
        if info.state.last_seq < start:
            self.caught_up.set()
        async with StreamReader(
            self._js, EVENTS_WILDCARD, start_seq=start, batch=BATCH, wait=BATCH_WAIT
        ) as reader:
            while True:
                batch = await reader.next_batch()
                if await self._should_wait(batch[0]):
                    break
                await self._apply(batch)
                self._loop_share.reset()
                more = batch[-1].metadata.num_pending > 0 or reader.buffered > 0
                self._progress.applied(batch[-1], more)
                if not more:
                    self.caught_up.set()
        # Closed, the reader costs the busy loop nothing while it waits; the next
        # one starts again from the checkpoint.
        self._progress.holding(batch[0])
        waited = await give_way(self._loop_share, self._max_lag - _age(batch[0]))
        log.debug(
            "memory.gave_way", seconds=round(waited, 3), seq=batch[0].metadata.sequence.stream
        )

    async def _should_wait(self, first: Msg) -> bool:
        """Whether to let the turns that keep the event loop busy run before indexing
        `first` and what follows it: not once it is `max_lag` old."""
        return 0 < self._max_lag and _age(first) < self._max_lag and await self._loop_share.busy()

    async def _apply(self, batch: list[Msg]) -> None:
        await self._projector.apply_messages(batch)


class Progress:
    """How far the projection trails the log, for the service's stats.

    `lag_seconds`: the age of the oldest event not yet indexed (0 when caught up),
    held back for a busy loop or simply not reached yet; `applied_seq` compares with
    the last sequence of CHAT_EVENTS (`nats stream info CHAT_EVENTS`).
    """

    def __init__(self) -> None:
        self.applied_seq = 0
        self.gave_way = 0  # times indexing waited for a busy event loop
        self._behind_since: float | None = None  # when the oldest event not indexed was stored

    def applied(self, last: Msg, more: bool) -> None:
        """`last` is indexed; `more`: events after it were already in the log."""
        self.applied_seq = last.metadata.sequence.stream
        # The next event was stored after `last`: its age is at most last's.
        self._behind_since = last.metadata.timestamp.timestamp() if more else None

    def holding(self, first: Msg) -> None:
        self.gave_way += 1
        self._behind_since = first.metadata.timestamp.timestamp()

    def lag_seconds(self) -> float:
        since = self._behind_since
        return 0.0 if since is None else round(max(0.0, time.time() - since), 3)

    def stats(self) -> dict[str, object]:
        return {
            "applied_seq": self.applied_seq,
            "lag_seconds": self.lag_seconds(),
            "gave_way": self.gave_way,
        }


def _age(msg: Msg) -> float:
    """Seconds since the stream stored `msg` (0 if its time is ahead of ours)."""
    return max(0.0, time.time() - msg.metadata.timestamp.timestamp())
