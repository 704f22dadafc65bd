"""The usage actor: projects the event log into the usage ledger and answers queries.

One usage actor owns one ledger file. It follows CHAT_EVENTS from the position stored
in the ledger (committed with the rows it produced), so after a restart it catches up,
and a dropped file is rebuilt from the start of the log. Reports and spend totals are
NATS micro service endpoints (`veil-usage`).

Spend totals are refused (503) until the ledger has first caught up with the log:
budgets fail closed rather than pass a key on the partial sums of a rebuild.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from actors.usage.projector import UsageProjector
from bus.service import Endpoint, ServiceError, TypedService, start_service
from bus.stream_reader import StreamReader
from bus.subjects import EVENTS_STREAM, EVENTS_WILDCARD, USAGE_QUERY, USAGE_SPEND
from contracts.usage import (
    SPEND_CODEC,
    SPEND_REPLY_CODEC,
    USAGE_QUERY_CODEC,
    USAGE_REPORT_CODEC,
    SpendReply,
    SpendRequest,
    UsageQuery,
    UsageReport,
)

__all__ = ["UsageActor"]

log = structlog.get_logger("veil.usage")

# Events applied per ledger transaction, and how long to wait to fill a batch.
BATCH = 512
BATCH_WAIT = 0.05


class UsageActor:
    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        projector: UsageProjector,
        *,
        version: str,
    ) -> None:
        self._nc = nc
        self._js = js
        self._projector = projector
        self._store = projector.store
        self._version = version
        self._service: TypedService | None = None
        self._task: asyncio.Task[None] | None = None
        self.caught_up = asyncio.Event()
        # The last log position applied in this run (`nats micro stats veil-usage`).
        self._applied_seq = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="usage-projector")
        query = Endpoint(
            name="query",
            subject=USAGE_QUERY,
            request=USAGE_QUERY_CODEC,
            reply=USAGE_REPORT_CODEC,
            handle=self._report,
        )
        spend = Endpoint(
            name="spend",
            subject=USAGE_SPEND,
            request=SPEND_CODEC,
            reply=SPEND_REPLY_CODEC,
            handle=self._spend,
        )
        self._service = await start_service(
            self._nc,
            name="veil-usage",
            version=self._version,
            description="Usage ledger: tokens, requests and cost by day, key, user and model",
            endpoints=[query, spend],
            stats_handler=lambda _endpoint: {
                "applied_seq": self._applied_seq,
                "caught_up": self.caught_up.is_set(),
            },
        )

    async def stop(self) -> None:
        if self._service is not None:
            await self._service.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- queries ------------------------------------------------------------

    async def _report(self, query: UsageQuery) -> UsageReport:
        return await self._store.report(query)

    async def _spend(self, request: SpendRequest) -> SpendReply:
        if not self.caught_up.is_set():
            raise ServiceError("503", "the usage ledger is still catching up with the log")
        return SpendReply(spends=[await self._store.spend(q) for q in request.queries])

    # -- projection ---------------------------------------------------------

    async def _follow(self) -> None:
        """Apply the log from the checkpoint on, forever; retry after failures."""
        while True:
            try:
                await self._follow_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.exception("usage.projector_failed", error=repr(error))
                await asyncio.sleep(1.0)

    async def _follow_once(self) -> None:
        start = await self._store.checkpoint() + 1
        info = await self._js.stream_info(EVENTS_STREAM)
        if start > info.state.last_seq + 1:
            # The ledger is ahead of the log: the stream was recreated. Rebuild.
            log.warning(
                "usage.ledger_ahead_of_log", checkpoint=start - 1, last_seq=info.state.last_seq
            )
            await self._store.reset()
            start = 1
        if info.state.last_seq < start:
            self.caught_up.set()
        async with StreamReader(
            self._js, EVENTS_WILDCARD, start_seq=start, batch=BATCH, wait=BATCH_WAIT
        ) as reader:
            while True:
                batch = await reader.next_batch()
                await self._projector.apply_messages(batch)
                self._applied_seq = batch[-1].metadata.sequence.stream
                if batch[-1].metadata.num_pending == 0 and reader.buffered == 0:
                    self.caught_up.set()
