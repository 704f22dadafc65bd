"""The gateway's side of a turn: send the command, then follow the turn's output."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Self

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from bus.codec import DecodeError
from bus.requests import BUS_DOWN, nats_request
from bus.subjects import (
    TURNS_WHERE,
    session_cancel,
    session_cmd,
    session_cmd_placed,
    session_out,
    worker_leases,
)
from bus.telemetry import outgoing
from contracts.errors import error_info
from contracts.leases import LEASE_PROBE_CODEC, LEASE_REPLY_CODEC, LeaseProbe
from contracts.session import (
    CANCEL_CODEC,
    OUTPUT_CODEC,
    SESSION_COMMAND_CODEC,
    TURN_REPLY_CODEC,
    CancelRequest,
    Delta,
    Deltas,
    OutputUnion,
    SessionCommandUnion,
    StartTurn,
    ToolDelta,
    TurnAccepted,
    TurnDone,
    TurnError,
    TurnRejected,
    TurnReplyUnion,
)
from edge.openai_wire import ApiError

__all__ = ["ClientGone", "TurnRelay", "ask_bus", "ask_session", "bus_unavailable", "run_turn"]

# How often a waiting relay checks that its HTTP client is still there.
POLL_SECONDS = 0.25
# How long to wait for deltas that the final message says were sent but are late.
STRAGGLER_SECONDS = 1.0
# A turn's output quiet this long: ask its worker whether it still runs the turn (a
# worker killed mid-turn publishes nothing more, and its turn would wait out its lease).
QUIET_SECONDS = 2.0
# How long the worker has to answer (no answer: taken as alive but busy), and how long a
# final message published just before a "no" may still take to arrive.
PROBE_SECONDS = 1.0
LAST_WORD_SECONDS = 0.5
# A request nobody says it has, asked this many times QUIET_SECONDS apart, was lost
# with its worker (sent to it just before it died, or waiting in its mailbox).
WHERE_MISSES = 2
WORKER_LOST = (
    "The worker running this turn stopped before it finished; retry the request (under "
    "the same Idempotency-Key it runs again)."
)


class ClientGone(Exception):
    """The HTTP client disconnected while its turn was running."""


BUS_UNAVAILABLE = "Veil's message bus is unavailable; try again shortly."


def bus_unavailable() -> ApiError:
    return ApiError(503, BUS_UNAVAILABLE, code="service_unavailable")


async def ask_bus(
    nc: Client,
    subject: str,
    payload: bytes,
    timeout: float,
    *,
    absent: str,
    late: str,
    unplaced: str | None = None,
) -> Msg:
    """One request from the gateway; bus failures become ApiErrors: 503 `absent` when
    nobody serves the subject, 504 `late` after `timeout`, 503 at once while the bus
    is down (instead of waiting out `timeout`). When nobody serves `subject` and
    `unplaced` is given, the request goes there instead (bus/placement.py: a partition
    between two workers is served by all of them)."""
    if not nc.is_connected:
        raise bus_unavailable()
    # The request's id and trace go along (bus/telemetry.py).
    headers = outgoing()
    try:
        try:
            return await nats_request(nc, subject, payload, timeout=timeout, headers=headers)
        except NoRespondersError:
            if unplaced is None:
                raise
        return await nats_request(nc, unplaced, payload, timeout=timeout, headers=headers)
    except NoRespondersError:
        raise ApiError(503, absent, code="service_unavailable") from None
    except NatsTimeout:
        raise ApiError(504, late, code="timeout") from None
    except BUS_DOWN:
        raise bus_unavailable() from None


async def ask_session(nc: Client, command: SessionCommandUnion, timeout: float) -> TurnReplyUnion:
    """One request to a session actor; refusals and bus failures become ApiErrors."""
    msg = await ask_bus(
        nc,
        session_cmd_placed(command.tenant, command.session_id),
        SESSION_COMMAND_CODEC.encode(command),
        timeout,
        absent="No session worker is running; try again shortly.",
        late="The session did not answer in time.",
        unplaced=session_cmd(command.tenant, command.session_id),
    )
    if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
        raise ApiError(
            500,
            f"The session actor failed: {msg.headers.get('Nats-Service-Error')}",
            code="actor_failed",
        )
    reply = TURN_REPLY_CODEC.decode(msg.data)
    if isinstance(reply, TurnRejected):
        raise ApiError.of(reply.error)
    return reply


async def _cancel(nc: Client, start: StartTurn) -> None:
    """Tell the session that nobody waits for this request: stop its turn if it runs,
    never start it if it waits (a retry under the same Idempotency-Key still may)."""
    with contextlib.suppress(Exception):
        for token in dict.fromkeys((start.turn_id, start.abandon_id)):
            await nc.publish(
                session_cancel(start.tenant, start.session_id, token),
                CANCEL_CODEC.encode(CancelRequest()),
            )
        await nc.flush(timeout=1)


async def _ask_while_present(
    nc: Client, start: StartTurn, timeout: float, client_gone: Callable[[], bool]
) -> TurnReplyUnion:
    """Send the turn and wait for the session's reply while the client is still there.

    A client that leaves (ClientGone) or a wait that times out (504) cancels the turn:
    queued behind another turn, it would otherwise run later for nobody.
    """
    task = asyncio.ensure_future(ask_session(nc, start, timeout))
    loop = asyncio.get_running_loop()
    try:
        asked = loop.time()
        misses = 0
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_SECONDS)
            if task in done:
                return task.result()
            if client_gone():
                raise ClientGone()
            if loop.time() - asked >= QUIET_SECONDS:
                # A worker that died with the request in hand never answers: ask who has it.
                misses = 0 if await _in_hand(nc, start.turn_id) else misses + 1
                asked = loop.time()
                if misses >= WHERE_MISSES:
                    raise ApiError(503, WORKER_LOST, code="worker_lost")
    except ClientGone:
        await _cancel(nc, start)
        raise
    except ApiError as error:
        if error.status == 504:
            await _cancel(nc, start)
        raise
    finally:
        task.cancel()


async def _in_hand(nc: Client, turn_id: str) -> bool:
    """Whether a worker says it has the turn in hand, queued or running. True when that
    cannot be told: no worker listens at all (workers of a version before this question,
    during a rolling upgrade), or the bus is away (which fails the request on its own)."""
    try:
        await nats_request(
            nc,
            TURNS_WHERE,
            LEASE_PROBE_CODEC.encode(LeaseProbe(turn_id=turn_id)),
            timeout=PROBE_SECONDS,
        )
    except NatsTimeout:
        return False  # workers listen, and none has it
    except (NoRespondersError, *BUS_DOWN):
        return True
    return True


async def run_turn(
    nc: Client, start: StartTurn, timeout: float, client_gone: Callable[[], bool]
) -> TurnDone | TurnError:
    """A non-streaming turn: one request, answered by the session actor with the result.

    Raises ClientGone (after cancelling the turn) when the client leaves first.
    """
    reply = await _ask_while_present(nc, start, timeout, client_gone)
    if isinstance(reply, TurnDone | TurnError):
        return reply
    raise ApiError(500, f"Unexpected reply from the session actor: {reply!r}", code="actor_failed")


class TurnRelay:
    """Subscribes to the turn's output before the command is sent, so nothing is missed."""

    def __init__(self, nc: Client, start: StartTurn) -> None:
        self._nc = nc
        self.start = start
        self._sub: Subscription | None = None
        # Filled by the subscription's callback: reading it costs no task per message,
        # which nats-py's next_msg spends.
        self._inbox: asyncio.Queue[OutputUnion] = asyncio.Queue()
        self.replay = False
        # The worker running the turn, asked whether it still does when the output is quiet.
        self.holder: str | None = None
        # For the metrics and the span: when (time.perf_counter) the first delta came,
        # and how the turn ended.
        self.first_output: float | None = None
        self.final: TurnDone | TurnError | None = None

    async def _on_message(self, msg: Msg) -> None:
        item = OUTPUT_CODEC.decode(msg.data)
        if isinstance(item, Deltas):
            for piece in item.items:
                self._inbox.put_nowait(piece)
        else:
            self._inbox.put_nowait(item)

    async def __aenter__(self) -> Self:
        self._sub = await self._nc.subscribe(
            session_out(self.start.tenant, self.start.session_id, self.start.turn_id),
            cb=self._on_message,
            pending_msgs_limit=0,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def send(self, timeout: float, client_gone: Callable[[], bool]) -> None:
        """Hand the turn to its session actor; raises ApiError if it is refused, and
        ClientGone (after cancelling it) if the client leaves while it waits."""
        reply = await _ask_while_present(self._nc, self.start, timeout, client_gone)
        if not isinstance(reply, TurnAccepted):
            raise ApiError(
                500, f"Unexpected reply from the session actor: {reply!r}", code="actor_failed"
            )
        self.replay = reply.replay
        self.holder = reply.holder

    async def cancel(self) -> None:
        await _cancel(self._nc, self.start)

    async def _next(self, timeout: float) -> OutputUnion | None:
        """The next item, or None after `timeout`."""
        try:
            return self._inbox.get_nowait()
        except asyncio.QueueEmpty:
            pass
        try:
            async with asyncio.timeout(timeout):
                return await self._inbox.get()
        except TimeoutError:
            return None

    async def batches(
        self, timeout: float, client_gone: Callable[[], bool]
    ) -> AsyncIterator[list[Delta | ToolDelta | TurnDone | TurnError]]:
        """Deltas in order, then exactly one TurnDone or TurnError, in lists of what
        had arrived together (the gateway writes each list at once).

        Raises ClientGone when the client left. Ends with a TurnError of its own when
        nothing final arrives within `timeout` (504, after cancelling the turn), when
        the bus goes away (503) or when the turn's worker is lost (503 worker_lost).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        order = _InOrder()
        heard = loop.time()
        while True:
            if client_gone():
                raise ClientGone()
            # Failures end the turn's output like the session's own errors do: as the last
            # item, which a stream that has begun writes as an OpenAI-shaped error event
            # (raised, it would only break the connection).
            if not self._nc.is_connected:
                # What was published while the bus was down is lost: do not wait for it.
                yield [self._ended(503, "service_unavailable", BUS_UNAVAILABLE, order)]
                return
            if loop.time() > deadline:
                await self.cancel()
                yield [self._ended(504, "timeout", "The turn did not finish in time.", order)]
                return
            item = await self._next(POLL_SECONDS)
            if item is None:
                if loop.time() - heard >= QUIET_SECONDS:
                    heard = loop.time()
                    item = await self._lost(order.received)
                if item is None:
                    continue
            heard = loop.time()
            batch: list[Delta | ToolDelta | TurnDone | TurnError] = []
            while item is not None:
                if isinstance(item, Delta | ToolDelta):
                    batch += order.take(item)
                elif isinstance(item, TurnDone | TurnError):
                    if item.deltas > order.received:
                        batch += await self._stragglers(order, item.deltas)
                    self.final = item
                    if self.first_output is None:
                        self.first_output = time.perf_counter()
                    batch.append(item)
                    yield batch
                    return
                item = self._inbox.get_nowait() if not self._inbox.empty() else None
            if batch:
                if self.first_output is None:
                    self.first_output = time.perf_counter()
                yield batch

    def _ended(self, status: int, code: str, message: str, order: _InOrder) -> TurnError:
        self.final = TurnError(error=error_info(status, code, message), deltas=order.received)
        return self.final

    async def _lost(self, received: int) -> OutputUnion | None:
        """A quiet turn's worker asked whether it still runs the turn: a TurnError when it
        is gone or dropped the turn (and no final message follows its answer), else None."""
        if self.holder is None:
            return None
        try:
            reply = await nats_request(
                self._nc,
                worker_leases(self.holder),
                LEASE_PROBE_CODEC.encode(LeaseProbe(turn_id=self.start.turn_id)),
                timeout=PROBE_SECONDS,
            )
            running = LEASE_REPLY_CODEC.decode(reply.data).running
        except NoRespondersError:
            running = False  # its connection, and so the process, is gone
        except (NatsTimeout, DecodeError, *BUS_DOWN):
            return None  # busy, cut off or not ours to judge: keep waiting
        if running:
            return None
        # A "no" may have overtaken the final message published just before it.
        last = await self._next(LAST_WORD_SECONDS)
        if last is not None:
            return last
        return TurnError(
            error=error_info(503, "worker_lost", WORKER_LOST), content="", deltas=received
        )

    async def _stragglers(self, order: _InOrder, sent: int) -> list[Delta | ToolDelta]:
        """Deltas published before the final message but delivered after it (they come
        from another connection), or lost: a moment for them; the final message carries
        the full text anyway, so what stays missing is sent from it (what went out is
        always its beginning: deltas go out in order)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STRAGGLER_SECONDS
        late: list[Delta | ToolDelta] = []
        while order.received < sent:
            item = await self._next(max(0.0, deadline - loop.time()))
            if item is None:
                break
            if isinstance(item, Delta | ToolDelta):
                late += order.take(item)
        return late


class _InOrder:
    """Deltas handed on in the order of their seq. One that arrives after a gap waits
    for the missing one: core NATS delivers at most once, and a message in flight when
    a node goes away is lost; sent on, the next one would leave a hole in the text."""

    __slots__ = ("_held", "received")

    def __init__(self) -> None:
        self.received = 0  # every seq up to this one was handed on
        self._held: dict[int, Delta | ToolDelta] = {}

    def take(self, item: Delta | ToolDelta) -> list[Delta | ToolDelta]:
        """What may go out now that `item` came: it and what waited on it, or nothing."""
        if item.seq <= self.received:
            return []  # a duplicate (a replayed turn's output)
        self._held[item.seq] = item
        out: list[Delta | ToolDelta] = []
        while self.received + 1 in self._held:
            self.received += 1
            out.append(self._held.pop(self.received))
        return out
