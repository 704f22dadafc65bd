"""The EventStore on NATS JetStream: one stream, one subject per session, one message per event.

Appends use optimistic concurrency (`Nats-Expected-Last-Subject-Sequence`), chained
event by event. Reads use the batched direct get, which needs `allow_direct` on the
stream (nats-server 2.11+).

A session's subject is `chat.events.<tenant>.<session id>`. Logs written before
sessions were per tenant sit under `chat.events.<session id>`; they are read, and
continued, where they are (a copy would change every stream sequence that the memory
index, the usage ledger and other sessions' records point at). Which tenant owns each
of them is read once per store, from their first events, so finding a session's
subject never costs a read of its own: another tenant's old session with the same id
looks exactly like a free id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, get_args

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import (
    DiscardPolicy,
    Header,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.client import JetStreamContext

from bus.codec import Codec
from bus.connection import replicas as configured_replicas
from bus.requests import nats_request
from bus.subjects import (
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    LEGACY_EVENTS_WILDCARD,
    direct_get,
    legacy_session_events,
    session_events,
    session_events_of_any_tenant,
    session_from_events_subject,
    session_key,
    stream_info,
)
from eventstore.errors import ConcurrencyConflict, EventStoreError, StoreUnavailable
from eventstore.events import EventUnion, SessionOpened
from eventstore.store import Appended, SessionInfo, StoredEvent
from eventstore.upcast import EVENT_CODEC

__all__ = [
    "DUPLICATE_WINDOW",
    "EVENT_TYPE_HEADER",
    "LOAD_BATCH",
    "UNAVAILABLE",
    "WRONG_LAST_SEQUENCE",
    "JetStreamEventStore",
    "create_stream",
    "ensure_stream",
]

EVENT_TYPE_HEADER = "Veil-Event-Type"
# Messages asked for per direct get request; the server pages larger reads for us.
LOAD_BATCH = 512
# How long the stream remembers a Nats-Msg-Id (seconds).
DUPLICATE_WINDOW = 120.0
# First events of legacy sessions read at once while learning their tenants.
LEGACY_READS = 64

WRONG_LAST_SEQUENCE = 10071
_STREAM_NAME_IN_USE = 10058
_STREAM_NOT_FOUND = 10059
_CODEC = EVENT_CODEC
_TAGS: dict[type, str] = {cls: str(cls.__struct_config__.tag) for cls in get_args(EventUnion)}
# What a connection in trouble raises; the caller may retry later.
UNAVAILABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    asyncio.TimeoutError,
)


class _PubAck(msgspec.Struct):
    """The stream's answer to a publish: where it stored the message, or why not."""

    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_ACK_CODEC: Codec[_PubAck] = Codec(_PubAck)


class _SubjectsState(msgspec.Struct):
    subjects: dict[str, int] | None = None


class _StreamInfo(msgspec.Struct):
    """What stream info answers with a subjects filter: one page of the subjects."""

    state: _SubjectsState = msgspec.field(default_factory=_SubjectsState)
    total: int = 0
    error: dict[str, Any] | None = None


_INFO_CODEC: Codec[_StreamInfo] = Codec(_StreamInfo)


class _NoStream(StoreUnavailable):
    """The events stream does not exist (yet)."""


class _Raw(NamedTuple):
    seq: int
    msg_id: str | None
    data: bytes


async def create_stream(js: JetStreamContext, config: StreamConfig) -> StreamInfo:
    """The stream named in `config`, created with it if it does not exist yet (another
    process may create it at the same moment); an existing one is left as it is."""
    name = config.name
    assert name is not None
    try:
        try:
            return await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            try:
                return await js.add_stream(config)
            except nats.js.errors.BadRequestError as e:
                # Another process created it between our two calls.
                if e.err_code != _STREAM_NAME_IN_USE:
                    raise
                return await js.stream_info(name)
    except UNAVAILABLE as e:
        raise StoreUnavailable(f"cannot ensure stream {name}: {e!r}") from e


async def ensure_stream(
    js: JetStreamContext,
    stream: str = EVENTS_STREAM,
    *,
    replicas: int | None = None,
    storage: Literal["file", "memory"] = "file",
) -> StreamInfo:
    """Create the events stream, or bring an existing one to our config; safe on every start.

    The replica count (VEIL_NATS_REPLICAS unless given) is used at creation only: an existing
    stream keeps its own, which an operator changes with `nats stream edit --replicas`; a
    worker started without the variable never shrinks a cluster's stream to one copy."""
    wanted: dict[str, Any] = {
        "subjects": [EVENTS_WILDCARD],
        "retention": RetentionPolicy.LIMITS,
        "storage": StorageType(storage),
        "allow_direct": True,
        "duplicate_window": DUPLICATE_WINDOW,
        "discard": DiscardPolicy.OLD,
        # An audit trail: nothing ages out or is dropped for space.
        "max_msgs": -1,
        "max_bytes": -1,
        "max_age": 0.0,
        "max_msgs_per_subject": -1,
    }
    copies = configured_replicas() if replicas is None else replicas
    info = await create_stream(js, StreamConfig(name=stream, num_replicas=copies, **wanted))
    try:
        current = info.config
        if all(getattr(current, key) == value for key, value in wanted.items()):
            return info
        # Keep whatever else an operator set (description, metadata, ...).
        return await js.update_stream(current.evolve(**wanted))
    except UNAVAILABLE as e:
        raise StoreUnavailable(f"cannot ensure stream {stream}: {e!r}") from e


class JetStreamEventStore:
    """Sessions' events in one JetStream stream, one subject per session."""

    def __init__(
        self,
        js: JetStreamContext,
        nc: Client,
        stream: str = EVENTS_STREAM,
        *,
        timeout: float = 5.0,
        load_batch: int = LOAD_BATCH,
    ) -> None:
        if load_batch < 1:
            # A batch of 0 is a plain single-message direct get: no end-of-batch marker.
            raise ValueError("load_batch must be at least 1")
        self._js = js
        self._nc = nc
        self._stream = stream
        self._timeout = timeout
        self._load_batch = load_batch
        self._direct_get_subject = direct_get(stream)
        self._info_subject = stream_info(stream)
        # Legacy session id -> its tenant, learned once (see the module's docstring).
        self._legacy: dict[str, str] | None = None
        self._legacy_lock = asyncio.Lock()

    async def subject(self, tenant: str, session_id: str) -> str:
        """Where the session's events are: its own subject, or its legacy one."""
        subject = session_events(tenant, session_id)  # validates both before any read
        if (await self._legacy_owners()).get(session_id) == tenant:
            return legacy_session_events(session_id)
        return subject

    async def legacy_tenant(self, session_id: str) -> str | None:
        return (await self._legacy_owners()).get(session_id)

    async def tenants_of(self, session_id: str) -> list[str]:
        """The tenants that have a session with this id, sorted (for operators' commands)."""
        tenants = {
            parts[0]
            for subject in await self._subjects(session_events_of_any_tenant(session_id))
            if (parts := session_from_events_subject(subject)) is not None and parts[0]
        }
        legacy = await self.legacy_tenant(session_id)
        return sorted(tenants | ({legacy} if legacy is not None else set()))

    async def load(self, tenant: str, session_id: str, after: int = 0) -> list[StoredEvent]:
        """Events of one session with seq > after, in order."""
        raws = await self._fetch(await self.subject(tenant, session_id), after)
        return [StoredEvent(seq=raw.seq, event=_CODEC.decode(raw.data)) for raw in raws]

    async def append(
        self,
        tenant: str,
        session_id: str,
        events: Sequence[EventUnion],
        *,
        expected_last_seq: int,
        dedupe_id: str | None = None,
    ) -> Appended:
        """Append events one message each, each one expecting the previous one's seq."""
        subject = await self.subject(tenant, session_id)
        key = session_key(tenant, session_id)
        if not events:
            last = await self.last_seq(tenant, session_id)
            if last != expected_last_seq:
                raise ConcurrencyConflict(session_id, expected_last_seq)
            return Appended(last)
        expected = expected_last_seq
        i = reused = 0
        while i < len(events):
            event = events[i]
            headers = {
                Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(expected),
                EVENT_TYPE_HEADER: _TAGS[type(event)],
            }
            if dedupe_id is not None:
                headers[Header.MSG_ID.value] = _msg_id(key, dedupe_id, i)
            try:
                ack = await self._publish(subject, _CODEC.encode(event), headers)
            except nats.js.errors.APIError as e:
                if e.err_code != WRONG_LAST_SEQUENCE:
                    raise EventStoreError(f"append to {subject} refused: {e}") from e
                if dedupe_id is None:
                    raise ConcurrencyConflict(session_id, expected_last_seq) from e
                # The server checks the expected seq before the Msg-Id, so a retry of a
                # batch that got stored lands here: look for our own messages instead.
                stored = await self._stored_prefix(
                    subject, expected_last_seq, key, dedupe_id, len(events)
                )
                if len(stored) <= i:
                    raise ConcurrencyConflict(session_id, expected_last_seq) from e
                reused += len(stored) - i
                i, expected = len(stored), stored[-1]
                continue
            except UNAVAILABLE as e:
                raise StoreUnavailable(f"append to {subject}: {e!r}") from e
            # A duplicate's ack carries the seq it was first stored at.
            reused += ack.duplicate
            expected = ack.seq
            i += 1
        return Appended(expected, reused=reused)

    async def _publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> _PubAck:
        """JetStream's publish, on the lean request (bus.requests); errors as nats-py raises them."""
        headers[Header.EXPECTED_STREAM.value] = self._stream
        reply = await nats_request(
            self._nc, subject, payload, timeout=self._timeout, headers=headers
        )
        ack = _ACK_CODEC.decode(reply.data)
        if ack.error is not None:
            nats.js.errors.APIError.from_error(ack.error)  # raises
        return ack

    async def first(self, tenant: str, session_id: str) -> StoredEvent | None:
        """The session's first event (one direct get), None if it has none."""
        return await self._first_on(await self.subject(tenant, session_id))

    async def _first_on(self, subject: str) -> StoredEvent | None:
        reply = await self._direct_get({"seq": 1, "next_by_subj": subject})
        if reply is None:
            return None
        seq, data = reply
        return StoredEvent(seq=seq, event=_CODEC.decode(data))

    async def last_seq(self, tenant: str, session_id: str) -> int:
        """The seq of the session's last event, 0 if it has none."""
        return await self._last_on(await self.subject(tenant, session_id))

    async def _last_on(self, subject: str) -> int:
        reply = await self._direct_get({"last_by_subj": subject})
        return 0 if reply is None else reply[0]

    async def sessions(self) -> list[SessionInfo]:
        """Every session with at least one event, sorted by tenant and id; one request per
        session."""
        counts = await self._subjects(EVENTS_WILDCARD)
        legacy = await self._legacy_owners()
        found: list[tuple[str, str, str]] = []
        for subject, count in counts.items():
            parts = session_from_events_subject(subject)
            if parts is None or count == 0:
                continue
            tenant, session_id = parts
            tenant = tenant or legacy.get(session_id)
            if tenant is not None:  # a legacy log without its opening belongs to nobody
                found.append((tenant, session_id, subject))
        found.sort()
        last_seqs = await asyncio.gather(*(self._last_on(subject) for *_, subject in found))
        return [
            SessionInfo(tenant=tenant, session_id=sid, events=counts[subject], last_seq=seq)
            for (tenant, sid, subject), seq in zip(found, last_seqs)
        ]

    async def _subjects(self, pattern: str) -> dict[str, int]:
        """The stream's subjects that match `pattern`, with their message counts, page by
        page (the server answers at most 100,000 subjects a request; nats-py's stream_info
        reads only the first page)."""
        counts: dict[str, int] = {}
        while True:
            body = json.dumps({"subjects_filter": pattern, "offset": len(counts)}).encode()
            try:
                reply = await nats_request(
                    self._nc, self._info_subject, body, timeout=self._timeout
                )
            except UNAVAILABLE as e:
                raise StoreUnavailable(f"stream info {self._stream}: {e!r}") from e
            info = _INFO_CODEC.decode(reply.data)
            if info.error is not None:
                if info.error.get("err_code") == _STREAM_NOT_FOUND:
                    raise _NoStream(f"stream info {self._stream}: no such stream")
                raise EventStoreError(f"stream info {self._stream}: {info.error}")
            page = info.state.subjects or {}
            counts.update(page)
            if not page or len(counts) >= info.total:
                return counts

    async def _legacy_owners(self) -> dict[str, str]:
        """Legacy session id -> tenant, read on first use: one read per legacy session,
        once per store (none are written any more)."""
        if self._legacy is not None:
            return self._legacy
        async with self._legacy_lock:
            if self._legacy is None:
                self._legacy = await self._read_legacy_owners()
        return self._legacy

    async def _read_legacy_owners(self) -> dict[str, str]:
        try:
            names = [
                parts[1]
                for subject in await self._subjects(LEGACY_EVENTS_WILDCARD)
                if (parts := session_from_events_subject(subject)) is not None and parts[0] is None
            ]
        except _NoStream:
            return {}  # no stream yet: it will only ever hold per-tenant subjects
        owners: dict[str, str] = {}
        for start in range(0, len(names), LEGACY_READS):
            chunk = names[start : start + LEGACY_READS]
            firsts = await asyncio.gather(
                *(self._first_on(legacy_session_events(name)) for name in chunk),
                return_exceptions=True,
            )
            for name, first in zip(chunk, firsts):
                if isinstance(first, StoreUnavailable):
                    raise first  # read again next time: nothing is learned half-way
                # An opening that does not decode makes that log nobody's, not the store's failure.
                if isinstance(first, StoredEvent) and isinstance(first.event, SessionOpened):
                    owners[name] = first.event.tenant
        return owners

    async def erase(self, tenant: str, session_id: str) -> int:
        """Securely delete each of the session's messages, then purge its subject.

        A message delete without `no_erase` makes the server overwrite the
        message in its block file; a subject purge alone may leave the bytes
        on disk until the block is compacted.
        """
        subject = await self.subject(tenant, session_id)
        raws = await self._fetch(subject, 0)
        try:
            for raw in raws:
                await self._js.delete_msg(self._stream, raw.seq)
            await self._js.purge_stream(self._stream, subject=subject)
        except UNAVAILABLE as e:
            raise StoreUnavailable(f"erase {subject}: {e!r}") from e
        except nats.js.errors.APIError as e:
            raise EventStoreError(f"erase {subject}: {e}") from e
        return len(raws)

    async def _direct_get(self, request: dict[str, object]) -> tuple[int, bytes] | None:
        """One message by direct get: its seq and data, None when there is none."""
        body = json.dumps(request).encode()
        try:
            reply = await nats_request(
                self._nc, self._direct_get_subject, body, timeout=self._timeout
            )
        except UNAVAILABLE as e:
            raise StoreUnavailable(f"direct get on {self._stream}: {e!r}") from e
        headers = reply.headers or {}
        status = _header(headers, Header.STATUS.value)
        if status == "404":
            return None
        seq = _seq(headers)
        if status is not None or seq == 0:
            raise _status_error(self._stream, headers)
        return seq, reply.data

    async def _stored_prefix(
        self, subject: str, after: int, key: str, dedupe_id: str, count: int
    ) -> list[int]:
        """Seqs of the batch's own messages right after `after`, as far as they got stored."""
        seqs: list[int] = []
        for raw in await self._fetch(subject, after, limit=count):
            if raw.msg_id != _msg_id(key, dedupe_id, len(seqs)):
                break
            seqs.append(raw.seq)
        return seqs

    async def _fetch(self, subject: str, after: int, limit: int | None = None) -> list[_Raw]:
        """Messages on subject with seq > after (at most limit), by batched direct get."""
        out: list[_Raw] = []
        # The server answers a batch with many messages to one inbox, then a status message.
        batch_done: asyncio.Future[dict[str, Any]] | None = None

        async def collect(msg: Msg) -> None:
            headers: dict[str, Any] = msg.headers or {}
            if Header.STATUS.value in headers:
                if batch_done is not None and not batch_done.done():
                    batch_done.set_result(headers)
                return
            seq = _seq(headers)
            if seq <= (out[-1].seq if out else after):
                # Fail the read now rather than time out or loop on a bad page.
                if batch_done is not None and not batch_done.done():
                    batch_done.set_exception(EventStoreError(f"bad seq in direct get: {headers}"))
                return
            out.append(_Raw(seq, _header(headers, Header.MSG_ID.value), msg.data))

        loop = asyncio.get_running_loop()
        try:
            sub = await self._nc.subscribe(self._nc.new_inbox(), cb=collect)
            try:
                while True:
                    start = out[-1].seq + 1 if out else after + 1
                    batch = (
                        self._load_batch
                        if limit is None
                        else min(self._load_batch, limit - len(out))
                    )
                    request = {"seq": start, "next_by_subj": subject, "batch": batch}
                    received = len(out)
                    batch_done = loop.create_future()
                    await self._nc.publish(
                        self._direct_get_subject, json.dumps(request).encode(), reply=sub.subject
                    )
                    end = await asyncio.wait_for(batch_done, self._timeout)
                    status = _header(end, Header.STATUS.value)
                    if status == "404":
                        return out
                    if status != "204":
                        raise _status_error(self._stream, end)
                    pending = int(_header(end, "Nats-Num-Pending") or "0")
                    if len(out) == received:
                        raise EventStoreError(f"direct get on {self._stream} made no progress")
                    if pending == 0 or (limit is not None and len(out) >= limit):
                        return out
            finally:
                # A dead connection has already dropped the subscription.
                with contextlib.suppress(*UNAVAILABLE):
                    await sub.unsubscribe()
        except UNAVAILABLE as e:
            raise StoreUnavailable(f"direct get on {self._stream}: {e!r}") from e


def _msg_id(key: str, dedupe_id: str, index: int) -> str:
    # The duplicate window spans the whole stream: scope ids to the session (its
    # session_key, tenant included) so two sessions reusing a dedupe id cannot swallow
    # each other's events.
    return f"{key}:{dedupe_id}:{index}"


def _header(headers: dict[str, Any], name: str) -> str | None:
    """One header's value; nats-py gives lists instead of strings when fast_mail_parser is installed."""
    value = headers.get(name)
    if isinstance(value, list):
        return str(value[0]) if value else None
    return None if value is None else str(value)


def _seq(headers: dict[str, Any]) -> int:
    """The stream sequence of a direct get reply, 0 if it has none."""
    value = _header(headers, "Nats-Sequence")
    return int(value) if value is not None and value.isdigit() else 0


def _status_error(stream: str, headers: dict[str, Any]) -> EventStoreError:
    status = _header(headers, Header.STATUS.value)
    description = (_header(headers, Header.DESCRIPTION.value) or "").strip()
    if status == "503":
        # No responders: the stream does not exist or has no allow_direct.
        return StoreUnavailable(f"no direct get on stream {stream} (503)")
    return EventStoreError(f"direct get on {stream} failed: {status} {description}")
