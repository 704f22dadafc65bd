"""Rate limit state shared by every gateway: one JetStream key-value entry per scope.

Each change reads the entry, computes the new state (edge/limit_window.py) and writes
it with compare-and-set on the revision it read (created when absent): two gateways
that change one scope at once cannot both win, and the loser reads again and retries
after a short random pause, a bounded number of times. Within one gateway, changes of
one scope take turns behind a lock, so they never conflict with each other, and the
entry this gateway wrote last is kept: the next change tries that revision without
reading first (one round trip, not two; a stale copy only costs a conflict). A refusal
is only ever decided on a fresh read.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import zlib
from collections.abc import Callable
from typing import TypeVar

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from bus.connection import replicas as configured_replicas
from bus.subjects import LIMITS_BUCKET, is_valid_id
from contracts.keys import Quota
from contracts.limits import LIMIT_STATE_CODEC, ScopeState
from edge import limit_window
from edge.limit_window import Ask, Verdict

__all__ = ["LimitStore", "LimitsUnavailable", "key_scope", "tenant_scope"]

log = structlog.get_logger("veil.limits")

T = TypeVar("T")
# A change computes (the state to write, or None to write nothing; its result).
Change = Callable[[ScopeState, float], tuple[ScopeState | None, T]]

# Compare-and-set tries per change, and the pauses between them (full jitter, doubling).
MAX_TRIES = 32
FIRST_PAUSE = 0.002
LONGEST_PAUSE = 0.05
# Locks shared by scopes with the same hash: bounded, whatever the number of scopes.
LOCKS = 64
# Entries this gateway wrote last, kept to skip a read; forgotten all at once past this.
MAX_CACHED = 4096


class LimitsUnavailable(Exception):
    """The limit store did not answer, failed, or stayed contended past every retry."""


def _token(value: str) -> str:
    """A KV key token: ids of the safe alphabet as they are, anything else as a digest
    (`=` is outside that alphabet, so the two never meet)."""
    if is_valid_id(value):
        return value
    return "=" + hashlib.sha256(value.encode()).hexdigest()[:32]


def key_scope(key_id: str) -> str:
    return f"key.{_token(key_id)}"


def tenant_scope(tenant: str) -> str:
    return f"tenant.{_token(tenant)}"


class LimitStore:
    def __init__(
        self, kv: KeyValue, timeout: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._kv = kv
        self.timeout = timeout
        # Wall-clock time: every gateway, on any machine, counts in the same seconds.
        self.clock = clock
        self._locks = [asyncio.Lock() for _ in range(LOCKS)]
        self._written: dict[str, tuple[int, ScopeState]] = {}

    @classmethod
    async def open(cls, js: JetStreamContext, timeout: float) -> LimitStore:
        """The bucket, made on first use (every gateway may be first)."""
        try:
            kv = await js.key_value(LIMITS_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            # direct=False: reads go to the stream's leader, never to a replica behind it.
            kv = await js.create_key_value(
                KeyValueConfig(
                    bucket=LIMITS_BUCKET, history=1, direct=False, replicas=configured_replicas()
                )
            )
        return cls(kv, timeout)

    async def charge(self, scope: str, quota: Quota, ask: Ask) -> Verdict:
        """Admit a request in this scope, or refuse it; raises LimitsUnavailable."""

        def step(state: ScopeState, now: float) -> tuple[ScopeState | None, Verdict]:
            verdict = limit_window.charge(state, quota, ask, now)
            return (verdict.state if verdict.admitted else None), verdict

        return await self._change(scope, step)

    async def undo(self, scope: str, ticket: str, second: int, requests: int, tokens: int) -> None:
        def step(state: ScopeState, now: float) -> tuple[ScopeState | None, None]:
            return limit_window.undo(state, ticket, second, requests, tokens, now), None

        await self._change(scope, step)

    async def settle(self, scope: str, ticket: str, second: int, tokens_delta: int) -> None:
        def step(state: ScopeState, now: float) -> tuple[ScopeState | None, None]:
            return limit_window.settle(state, ticket, second, tokens_delta, now), None

        await self._change(scope, step)

    async def _change(self, scope: str, change: Change[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                async with self._locks[zlib.crc32(scope.encode()) % LOCKS]:
                    return await self._cas(scope, change)
        except TimeoutError:
            raise LimitsUnavailable(f"no answer within {self.timeout:g} s") from None
        except nats.errors.Error as error:
            raise LimitsUnavailable(f"{type(error).__name__}: {error}") from None

    async def _cas(self, scope: str, change: Change[T]) -> T:
        fresh = False
        for attempt in range(MAX_TRIES):
            known = None if fresh else self._written.get(scope)
            if known is None:
                known = await self._read(scope)
                fresh = True
            revision, state = known
            new, result = change(state, self.clock())
            if new is None:
                if fresh:
                    return result
                fresh = True  # decided on a copy: decide again on what is stored
                continue
            try:
                written = await self._kv.update(scope, LIMIT_STATE_CODEC.encode(new), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                self._written.pop(scope, None)  # someone else wrote: read it next
                await asyncio.sleep(random.uniform(0, min(LONGEST_PAUSE, FIRST_PAUSE * 2**attempt)))
                continue
            if len(self._written) >= MAX_CACHED:
                self._written.clear()
            self._written[scope] = (written, new)
            return result
        raise LimitsUnavailable(f"{scope} stayed contended after {MAX_TRIES} tries")

    async def _read(self, scope: str) -> tuple[int, ScopeState]:
        """The entry's revision and state; (0, empty) when there is none yet."""
        try:
            entry = await self._kv.get(scope)
        except nats.js.errors.KeyNotFoundError as missing:
            # A deleted entry leaves a marker whose revision the next write must name.
            marker = missing.entry
            return (marker.revision or 0) if marker is not None else 0, ScopeState()
        if not entry.value:
            return entry.revision or 0, ScopeState()
        try:
            return entry.revision or 0, LIMIT_STATE_CODEC.decode(entry.value)
        except msgspec.DecodeError:
            log.warning("limits.unreadable_entry", scope=scope)
            return entry.revision or 0, ScopeState()
