"""Turn leases with a holder that can be asked: a dead worker frees its sessions in seconds.

A turn's lease (TurnStarted.lease_until) is as long as a turn may take, ten minutes
by default. A worker that dies mid-turn (SIGKILL, OOM, a lost machine) would hold
its sessions for that long. So each turn records the worker that runs it, and a
writer that finds the lease held asks that worker, on `chat.worker.<id>.leases`,
whether it still runs the turn; it asks again every few seconds while it waits.
No responders (the process is gone: its subscription died with its connection),
or "no" (the worker lives but dropped the turn, e.g. its actor crashed), frees the
session at once. No answer in time (a busy or cut-off worker) counts as alive: the
lease and the log's expected-sequence check still bound the overlap.
"""

from __future__ import annotations

import contextlib
import secrets
from collections import Counter
from collections.abc import Iterator

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from bus.codec import DecodeError
from bus.requests import nats_request
from bus.subjects import TURNS_WHERE, is_valid_id, worker_leases
from contracts.leases import LEASE_PROBE_CODEC, LEASE_REPLY_CODEC, LeaseProbe, LeaseReply

__all__ = ["PROBE_TIMEOUT", "LeaseProbe", "LeaseReply", "Leases"]

log = structlog.get_logger("veil.leases")

# How long a holder has to answer before it is taken as alive but busy.
PROBE_TIMEOUT = 1.0


class Leases:
    """The turns this worker runs; answers and asks whether a lease's holder still runs it."""

    def __init__(self, nc: Client, worker_id: str | None = None) -> None:
        self._nc = nc
        self.worker_id = worker_id or f"w_{secrets.token_hex(8)}"
        self._running: set[str] = set()
        # Turns admitted to a mailbox here and not answered yet (they may wait there).
        self._in_hand: Counter[str] = Counter()
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        self._subs = [
            await self._nc.subscribe(worker_leases(self.worker_id), cb=self._answer),
            await self._nc.subscribe(TURNS_WHERE, cb=self._answer_where),
        ]

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []

    def hand(self, turn_id: str) -> None:
        """A request for `turn_id` entered a mailbox here: asked where it is, say here."""
        self._in_hand[turn_id] += 1

    def drop(self, turn_id: str) -> None:
        """That request was answered (or refused)."""
        left = self._in_hand[turn_id] - 1
        if left > 0:
            self._in_hand[turn_id] = left
        else:
            self._in_hand.pop(turn_id, None)

    async def _answer_where(self, msg: Msg) -> None:
        try:
            probe = LEASE_PROBE_CODEC.decode(msg.data)
        except DecodeError:
            return
        if probe.turn_id in self._running or probe.turn_id in self._in_hand:
            with contextlib.suppress(Exception):
                await msg.respond(LEASE_REPLY_CODEC.encode(LeaseReply(running=True)))

    @contextlib.contextmanager
    def holding(self, turn_id: str) -> Iterator[None]:
        """While the block runs, this worker answers that it runs `turn_id`."""
        self._running.add(turn_id)
        try:
            yield
        finally:
            self._running.discard(turn_id)

    async def _answer(self, msg: Msg) -> None:
        try:
            probe = LEASE_PROBE_CODEC.decode(msg.data)
        except DecodeError:
            return
        with contextlib.suppress(Exception):
            await msg.respond(
                LEASE_REPLY_CODEC.encode(LeaseReply(running=probe.turn_id in self._running))
            )

    async def holder_runs(self, holder: str, turn_id: str) -> bool | None:
        """Whether `holder` still runs `turn_id`: True, False (gone or dropped), None (no answer)."""
        if holder == self.worker_id:
            return turn_id in self._running
        if not is_valid_id(holder):
            return None  # not a holder this code wrote: wait the lease out
        try:
            reply = await nats_request(
                self._nc,
                worker_leases(holder),
                LEASE_PROBE_CODEC.encode(LeaseProbe(turn_id=turn_id)),
                timeout=PROBE_TIMEOUT,
            )
        except NoRespondersError:
            return False
        except NatsTimeout:
            log.info("lease.holder_silent", holder=holder, turn=turn_id)
            return None
        try:
            return LEASE_REPLY_CODEC.decode(reply.data).running
        except DecodeError:
            return None
