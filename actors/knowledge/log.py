"""The KB_EVENTS stream: one subject per collection, `kb.events.<collection>`.

Appends to a collection carry the expected last subject sequence, so two
ingestions of one collection cannot interleave their decisions.
"""

from __future__ import annotations

from collections.abc import Sequence

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import Header, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext

from bus.connection import replicas as configured_replicas
from bus.subjects import KB_STREAM, KB_WILDCARD, collection_from_subject, collection_subject
from eventstore.errors import ConcurrencyConflict, EventStoreError, StoreUnavailable
from eventstore.jetstream import UNAVAILABLE, WRONG_LAST_SEQUENCE, create_stream
from eventstore.knowledge import CODEC, KbEvent

__all__ = ["KnowledgeLog"]


class KnowledgeLog:
    """Append and read knowledge events."""

    def __init__(self, js: JetStreamContext, *, timeout: float = 10.0) -> None:
        self._js = js
        self._timeout = timeout

    @classmethod
    def of(cls, nc: Client) -> KnowledgeLog:
        return cls(nc.jetstream())

    async def ensure(self, *, replicas: int | None = None) -> None:
        """Create the stream if it does not exist; safe on every start."""
        config = StreamConfig(
            name=KB_STREAM,
            subjects=[KB_WILDCARD],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=configured_replicas() if replicas is None else replicas,
            allow_direct=True,
            max_msgs=-1,
            max_bytes=-1,
            max_age=0.0,
        )
        await create_stream(self._js, config)

    async def append(
        self, collection: str, events: Sequence[KbEvent], *, expected_last_seq: int
    ) -> list[int]:
        """Append events in order, each expecting the previous one's seq; returns their seqs."""
        subject = collection_subject(collection)
        expected = expected_last_seq
        seqs: list[int] = []
        for event in events:
            if event.collection != collection:
                raise ValueError(f"event of {event.collection!r} appended to {collection!r}")
            headers = {Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(expected)}
            try:
                ack = await self._js.publish(
                    subject,
                    CODEC.encode(event),
                    timeout=self._timeout,
                    stream=KB_STREAM,
                    headers=headers,
                )
            except nats.js.errors.APIError as e:
                if e.err_code == WRONG_LAST_SEQUENCE:
                    raise ConcurrencyConflict(collection, expected) from e
                raise EventStoreError(f"append to {subject} refused: {e}") from e
            except UNAVAILABLE as e:
                raise StoreUnavailable(f"append to {subject}: {e!r}") from e
            expected = ack.seq
            seqs.append(ack.seq)
        return seqs

    async def last_seq(self, collection: str) -> int:
        """Seq of the collection's last event, 0 when it has none."""
        try:
            msg = await self._js.get_last_msg(
                KB_STREAM, collection_subject(collection), direct=True
            )
        except nats.js.errors.NotFoundError:
            return 0
        except UNAVAILABLE as e:
            raise StoreUnavailable(f"last event of {collection}: {e!r}") from e
        assert msg.seq is not None
        return msg.seq

    async def read(
        self, collection: str | None = None, *, after: int = 0
    ) -> list[tuple[int, KbEvent]]:
        """(seq, event) of one collection, or of all when None, with seq > after, oldest first."""
        subject = collection_subject(collection) if collection is not None else KB_WILDCARD
        out: list[tuple[int, KbEvent]] = []
        seq = after + 1
        while True:
            try:
                msg = await self._js.get_msg(
                    KB_STREAM, seq, next=True, subject=subject, direct=True
                )
            except nats.js.errors.NotFoundError:
                return out
            except UNAVAILABLE as e:
                raise StoreUnavailable(f"reading {subject}: {e!r}") from e
            assert msg.data is not None and msg.seq is not None
            out.append((msg.seq, CODEC.decode(msg.data)))
            seq = msg.seq + 1

    async def collections(self) -> list[str]:
        """Names of collections with at least one event, sorted."""
        try:
            info = await self._js.stream_info(KB_STREAM, subjects_filter=KB_WILDCARD)
        except nats.js.errors.NotFoundError:
            return []
        except UNAVAILABLE as e:
            raise StoreUnavailable(f"stream info {KB_STREAM}: {e!r}") from e
        return sorted(collection_from_subject(s) for s in (info.state.subjects or {}))
