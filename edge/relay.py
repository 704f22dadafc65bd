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

from bus.requests import BUS_DOWN, nats_request
from bus.subjects import session_cancel, session_cmd, session_cmd_placed, session_out
from bus.telemetry import outgoing
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


class ClientGone(Exception):
    """The HTTP client disconnected while its turn was running."""


def bus_unavailable() -> ApiError:
    return ApiError(
        503, "Veil's message bus is unavailable; try again shortly.", code="service_unavailable"
    )


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
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_SECONDS)
            if task in done:
                return task.result()
            if client_gone():
                raise ClientGone()
    except ClientGone:
        await _cancel(nc, start)
        raise
    except ApiError as error:
        if error.status == 504:
            await _cancel(nc, start)
        raise
    finally:
        task.cancel()


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

        Raises ClientGone when the client left, and ApiError(504) (after
        cancelling the turn) when nothing final arrives within `timeout`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        received = 0
        while True:
            if client_gone():
                raise ClientGone()
            if not self._nc.is_connected:
                # What was published while the bus was down is lost: do not wait for it.
                raise bus_unavailable()
            if loop.time() > deadline:
                await self.cancel()
                raise ApiError(504, "The turn did not finish in time.", code="timeout")
            item = await self._next(POLL_SECONDS)
            if item is None:
                continue
            batch: list[Delta | ToolDelta | TurnDone | TurnError] = []
            while item is not None:
                if isinstance(item, Delta | ToolDelta):
                    if item.seq > received:
                        if not received:
                            self.first_output = time.perf_counter()
                        received = item.seq
                        batch.append(item)
                elif isinstance(item, TurnDone | TurnError):
                    if item.deltas > received:
                        batch += await self._stragglers(received, item.deltas)
                    self.final = item
                    if self.first_output is None:
                        self.first_output = time.perf_counter()
                    batch.append(item)
                    yield batch
                    return
                item = self._inbox.get_nowait() if not self._inbox.empty() else None
            if batch:
                yield batch

    async def _stragglers(self, received: int, sent: int) -> list[Delta | ToolDelta]:
        """Deltas published before the final message but delivered after it (they come
        from another connection): a moment for them; the final message carries the
        full text anyway, so what stays missing is sent from it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STRAGGLER_SECONDS
        late: list[Delta | ToolDelta] = []
        while received < sent:
            item = await self._next(max(0.0, deadline - loop.time()))
            if item is None:
                break
            if isinstance(item, Delta | ToolDelta) and item.seq > received:
                received = item.seq
                late.append(item)
        return late
