"""Sessions placed on workers: which worker serves which partition of the session commands.

Without placement every session command goes to the queue group of all workers, so
with several workers a session's turns land on any of them, and each may activate the
session's actor again (a snapshot read plus the events after it). With placement a
session's key hashes to one of PARTITIONS partitions (bus/subjects.py), the gateway
sends its commands to that partition's subject, and while the membership is stable one
worker serves each partition: the session's live actor stays where it is.

Membership is heard, not stored: every member publishes a heartbeat every HEARTBEAT
seconds and counts as members those heard within LAPSE. Each computes the owner of
every partition by rendezvous hashing (the member with the highest hash of member and
partition), so all agree without further talk, and a member that joins or leaves moves
only its own share. A newcomer first asks who is there (a joining beat, which the others
answer but do not count), subscribes to its share, and only then beats as a member: the
others let its share go once it serves it. A member that stops says so and its
partitions move at once; one that dies stops being heard and its partitions move after
LAPSE.

Placement speeds sessions up; it is never a condition of being served. A command for a
partition nobody serves at that moment (the gap of a move) finds no responders, and
the gateway sends it to the queue group of all workers instead. Two members serving one
partition for a moment (one back after being cut off) is safe as well: they subscribe in
one queue group, so each command reaches one of them, and the log's expected-sequence
check keeps a single writer per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterable

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.codec import Codec, DecodeError

__all__ = ["HEARTBEAT", "LAPSE", "Beat", "Membership", "owned_by", "owners"]

log = structlog.get_logger("veil.placement")

# A member is heard every HEARTBEAT seconds and forgotten after LAPSE without a word: a
# dead worker's partitions move within LAPSE + HEARTBEAT.
HEARTBEAT = 1.0
LAPSE = 3.5
# How long a new member listens for the others before it takes partitions (they answer
# a newcomer's first beat at once).
SETTLE = 0.25


class Beat(msgspec.Struct, frozen=True):
    """A member's heartbeat (JSON: readable with `nats sub chat.placement.>`)."""

    member: str
    # Not yet serving: answer it, do not count it (see start).
    joining: bool = False
    leaving: bool = False


_BEAT = Codec[Beat](Beat)


def _weight(member: str, partition: int) -> int:
    digest = hashlib.blake2b(f"{member}/{partition}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owners(members: Iterable[str], partitions: int) -> list[str | None]:
    """The owner of each partition (None with no members): rendezvous hashing."""
    ranked = sorted(set(members))
    if not ranked:
        return [None] * partitions
    return [max(ranked, key=lambda m: _weight(m, p)) for p in range(partitions)]


def owned_by(member: str, members: Iterable[str], partitions: int) -> frozenset[int]:
    """The partitions `member` serves among `members` (itself included)."""
    table = owners({*members, member}, partitions)
    return frozenset(p for p, owner in enumerate(table) if owner == member)


OnChange = Callable[[frozenset[int]], Awaitable[None]]


class Membership:
    """One member of a placement group: heartbeats, the members heard, its partitions.

    `on_change` is called with the partitions this member serves whenever they change
    (from one task, one call at a time), and with none when it stops.
    """

    def __init__(
        self,
        nc: Client,
        subject: str,
        member: str,
        partitions: int,
        on_change: OnChange,
        *,
        heartbeat: float = HEARTBEAT,
        lapse: float = LAPSE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nc = nc
        self._subject = subject
        self.member = member
        self._partitions = partitions
        self._on_change = on_change
        self._heartbeat = heartbeat
        self._lapse = lapse
        self._clock = clock
        self._heard: dict[str, float] = {}
        self._owned: frozenset[int] | None = None
        self._wake = asyncio.Event()
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def members(self) -> frozenset[str]:
        """The members heard within LAPSE, this one included."""
        return frozenset({*self._heard, self.member})

    @property
    def owned(self) -> frozenset[int]:
        return self._owned or frozenset()

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._subject, cb=self._hear)
        await self._beat(joining=True)
        with contextlib.suppress(Exception):
            await self._nc.flush(timeout=1)
        await asyncio.sleep(min(SETTLE, self._heartbeat))
        await self._place()
        # Serving its share now: the others may let it go.
        await self._beat()
        self._task = asyncio.create_task(self._run(), name=f"placement:{self.member}")

    async def stop(self) -> None:
        """Say that this member leaves (its partitions move at once), then serve none."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        await self._beat(leaving=True)
        with contextlib.suppress(Exception):
            await self._nc.flush(timeout=1)
        if self._owned:
            self._owned = frozenset()
            await self._on_change(self._owned)

    async def _beat(self, *, joining: bool = False, leaving: bool = False) -> None:
        # While the bus is away the beat is dropped or buffered: the others stop hearing
        # this member, which is the truth.
        beat = Beat(member=self.member, joining=joining, leaving=leaving)
        with contextlib.suppress(Exception):
            await self._nc.publish(self._subject, _BEAT.encode(beat))

    async def _hear(self, msg: Msg) -> None:
        try:
            beat = _BEAT.decode(msg.data)
        except DecodeError:
            return
        if beat.member == self.member:
            return
        if beat.joining:
            await self._beat()  # so the newcomer knows whom to leave alone
            return
        if beat.leaving:
            if self._heard.pop(beat.member, None) is not None:
                log.info("placement.member_left", member=beat.member)
                self._wake.set()
            return
        if beat.member not in self._heard:
            log.info("placement.member_joined", member=beat.member)
            self._wake.set()
        self._heard[beat.member] = self._clock()

    async def _run(self) -> None:
        next_beat = self._clock() + self._heartbeat
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_beat - self._clock())):
                    await self._wake.wait()
            self._wake.clear()
            if self._clock() >= next_beat:
                await self._beat()
                next_beat = self._clock() + self._heartbeat
            try:
                await self._place()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the next round tries again
                log.warning("placement.change_failed", error=repr(error))
                self._owned = None

    async def _place(self) -> None:
        now = self._clock()
        for member, heard in list(self._heard.items()):
            if now - heard > self._lapse:
                del self._heard[member]
                log.warning("placement.member_lapsed", member=member)
        owned = owned_by(self.member, self._heard, self._partitions)
        if owned != self._owned:
            self._owned = owned
            await self._on_change(owned)
