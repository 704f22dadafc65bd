"""Placement (bus/placement.py): rendezvous hashing, and members agreeing over a real
nats-server on who serves which partition, as members come, leave and die."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import pytest
from nats.aio.client import Client

from bus.placement import Membership, owned_by, owners
from bus.subjects import (
    PARTITIONS,
    partition_of,
    session_cmd,
    session_cmd_placed,
    session_key_from_cmd_subject,
    session_partition_wildcard,
)

SUBJECT = "test.placement"
# Hang detector only: every wait below ends on a condition.
PATIENCE = 15.0


def test_every_partition_has_one_owner_and_shares_are_even() -> None:
    members = [f"w_{i}" for i in range(4)]
    table = owners(members, PARTITIONS)
    assert all(owner in members for owner in table)
    shares = [table.count(m) for m in members]
    assert sum(shares) == PARTITIONS
    assert min(shares) >= PARTITIONS // 8  # nobody starves (expected 16 each)
    # Everyone computes the same table, whatever order it heard the members in.
    for order in itertools.permutations(members):
        assert owners(order, PARTITIONS) == table
    assert owners([], 4) == [None] * 4


def test_a_member_coming_or_going_moves_only_its_share() -> None:
    before = owners(["w_a", "w_b", "w_c"], PARTITIONS)
    after = owners(["w_a", "w_b", "w_c", "w_d"], PARTITIONS)
    moved = [p for p in range(PARTITIONS) if before[p] != after[p]]
    assert moved, "a newcomer takes some partitions"
    assert all(after[p] == "w_d" for p in moved)  # only to the newcomer
    gone = owners(["w_a", "w_c"], PARTITIONS)
    assert all(gone[p] == before[p] for p in range(PARTITIONS) if before[p] != "w_b")
    assert owned_by("w_a", [], PARTITIONS) == frozenset(range(PARTITIONS))


def test_placed_subjects_name_the_session_and_its_partition() -> None:
    placed = session_cmd_placed("acme", "s-1")
    assert placed == f"{session_cmd('acme', 's-1')}.{partition_of('acme', 's-1')}"
    assert session_key_from_cmd_subject(placed) == "acme.s-1"
    assert session_key_from_cmd_subject(session_cmd("acme", "s-1")) == "acme.s-1"
    # The tenant is part of the key: the same name in two tenants hashes apart.
    spread = {partition_of(f"t{i}", "same") for i in range(200)}
    assert len(spread) > PARTITIONS // 2
    with pytest.raises(ValueError):
        session_partition_wildcard(PARTITIONS)


async def test_a_placed_command_reaches_its_partitions_subscriber(nc: Client) -> None:
    p = partition_of("acme", "s-1")
    got: asyncio.Queue[str] = asyncio.Queue()

    async def on(msg: nats.aio.msg.Msg) -> None:
        await got.put(msg.subject)

    await nc.subscribe(session_partition_wildcard(p), cb=on)
    await nc.subscribe(session_partition_wildcard((p + 1) % PARTITIONS), cb=on)
    await nc.publish(session_cmd_placed("acme", "s-1"), b"x")
    await nc.publish(session_cmd("acme", "s-1"), b"y")  # unplaced: no partition's
    assert await asyncio.wait_for(got.get(), PATIENCE) == session_cmd_placed("acme", "s-1")
    await nc.flush()
    assert got.empty()


class _Member:
    """A member on a connection of its own, recording what it was told to serve."""

    def __init__(
        self,
        nc: Client,
        name: str,
        *,
        heartbeat: float,
        lapse: float,
        journal: list[tuple[str, frozenset[int]]] | None = None,
    ) -> None:
        self.nc = nc
        self.name = name
        self.journal = journal if journal is not None else []
        self.serving: frozenset[int] = frozenset()
        self.membership = Membership(
            nc, SUBJECT, name, PARTITIONS, self._serve, heartbeat=heartbeat, lapse=lapse
        )

    async def _serve(self, owned: frozenset[int]) -> None:
        self.serving = owned
        self.journal.append((self.name, owned))


@pytest.fixture
async def connect(nats_url: str) -> AsyncIterator[Callable[[], Awaitable[Client]]]:
    opened: list[Client] = []

    async def one() -> Client:
        client = await nats.connect(nats_url)
        opened.append(client)
        return client

    yield one
    for client in opened:
        if not client.is_closed:
            await client.close()


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(PATIENCE):
        while not condition():
            await asyncio.sleep(0.02)


def _partitioned(members: list[_Member]) -> bool:
    """Every partition served by exactly one of `members`."""
    served = [p for m in members for p in m.serving]
    return sorted(served) == list(range(PARTITIONS))


async def test_members_split_the_partitions_and_take_over_from_one_that_leaves(
    connect: Callable[[], Awaitable[Client]],
) -> None:
    # A long lapse: taking over from a member that says it leaves must not wait for it.
    members = [_Member(await connect(), f"w_{i}", heartbeat=0.1, lapse=60) for i in range(3)]
    for member in members:
        await member.membership.start()
    await _until(lambda: _partitioned(members))
    assert all(m.serving for m in members)
    assert {m.membership.members for m in members} == {frozenset({"w_0", "w_1", "w_2"})}
    kept = {m.membership.member: m.serving for m in members}

    await members[1].membership.stop()
    assert members[1].serving == frozenset()
    await _until(lambda: _partitioned([members[0], members[2]]))
    # The others kept what they had and took the leaver's share.
    assert kept["w_0"] <= members[0].serving and kept["w_2"] <= members[2].serving
    for member in (members[0], members[2]):
        await member.membership.stop()


async def test_a_dead_members_partitions_move_after_the_lapse(
    connect: Callable[[], Awaitable[Client]],
) -> None:
    alive = _Member(await connect(), "w_alive", heartbeat=0.05, lapse=0.3)
    doomed = _Member(await connect(), "w_doomed", heartbeat=0.05, lapse=0.3)
    await alive.membership.start()
    await doomed.membership.start()
    await _until(lambda: _partitioned([alive, doomed]) and bool(doomed.serving))
    # Its connection goes without a word (as a SIGKILLed process's does).
    assert doomed.membership._task is not None
    doomed.membership._task.cancel()
    await doomed.nc.close()
    await _until(lambda: alive.serving == frozenset(range(PARTITIONS)))
    assert alive.membership.members == frozenset({"w_alive"})
    await alive.membership.stop()


async def test_a_newcomer_serves_its_share_before_the_others_let_it_go(
    connect: Callable[[], Awaitable[Client]],
) -> None:
    # Heartbeats far apart: the newcomer learns of the old member from its answer, and
    # the old member of the newcomer from the beat it sends once it serves its share.
    journal: list[tuple[str, frozenset[int]]] = []
    old = _Member(await connect(), "w_old", heartbeat=60, lapse=120, journal=journal)
    await old.membership.start()
    assert old.serving == frozenset(range(PARTITIONS))
    new = _Member(await connect(), "w_new", heartbeat=60, lapse=120, journal=journal)
    await new.membership.start()
    await _until(lambda: _partitioned([old, new]))
    assert new.serving and old.serving
    # Never a partition served by nobody: the newcomer took its share, then the old
    # member let it go.
    assert journal == [
        ("w_old", frozenset(range(PARTITIONS))),
        ("w_new", new.serving),
        ("w_old", old.serving),
    ]
    await new.membership.stop()
    await old.membership.stop()
