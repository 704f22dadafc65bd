"""Session snapshots: a session's folded state as of a log position, to activate from.

A session activates from its latest snapshot plus the events after it instead of
folding its whole log. The log stays the truth (rule 1): a snapshot is only used when
it is certainly the fold of that log's prefix, and anything doubtful (another schema
version, undecodable bytes, another session's or tenant's state, a position that is not
an event of the session's log, as one past its end) is ignored for a full fold.

The version is the hand-kept SNAPSHOT_EVOLVE (bump it when `evolve` folds the same
events differently) joined with a digest of SessionState's schema, so a change of the
state's shape retires every old snapshot by itself.

MessagePack, not JSON: a snapshot is a cache no person reads, and a state of 4,000
messages decodes several times faster.
"""

from __future__ import annotations

import hashlib

import msgspec

from actors import session
from eventstore.snapshots import SnapshotStore
from eventstore.store import EventStore, StoredEvent

__all__ = [
    "SNAPSHOT_EVERY",
    "SNAPSHOT_VERSION",
    "Snapshot",
    "decode",
    "encode",
    "restore",
]

# A snapshot is written once this many events were appended since the last one (or since
# an activation that folded them): a fold of up to 100 events is well under a millisecond.
SNAPSHOT_EVERY = 100
# Bump when `evolve` folds the same events into a different state.
SNAPSHOT_EVOLVE = 1
_SCHEMA = msgspec.json.encode(msgspec.json.schema(session.SessionState), order="sorted")
SNAPSHOT_VERSION = f"{SNAPSHOT_EVOLVE}-{hashlib.sha256(_SCHEMA).hexdigest()[:16]}"


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    version: str
    tenant: str
    session_id: str
    # The log position the state covers: the seq of the last event folded into it.
    seq: int
    state: session.SessionState


class _Head(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot's header alone: a foreign version is refused before its state is read."""

    version: str


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Snapshot)
_head = msgspec.msgpack.Decoder(_Head)


def encode(tenant: str, session_id: str, seq: int, state: session.SessionState) -> bytes:
    # int(): an append's result is an int subclass (Appended), which msgspec does not encode.
    snapshot = Snapshot(
        version=SNAPSHOT_VERSION, tenant=tenant, session_id=session_id, seq=int(seq), state=state
    )
    return _encoder.encode(snapshot)


def decode(data: bytes, tenant: str, session_id: str) -> Snapshot | None:
    """The snapshot of exactly this session at this version, None for anything else."""
    try:
        if _head.decode(data).version != SNAPSHOT_VERSION:
            return None
        snapshot = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    state = snapshot.state
    if (
        snapshot.tenant != tenant
        or snapshot.session_id != session_id
        or snapshot.seq <= 0
        or state.tenant not in (None, tenant)
        or state.session_id not in (None, session_id)
    ):
        return None
    return snapshot


async def restore(
    store: EventStore, snapshots: SnapshotStore | None, tenant: str, session_id: str
) -> tuple[session.SessionState, int, list[StoredEvent]]:
    """Where a session's fold starts, and the events still to fold onto it.

    From the snapshot when one is usable, else from the initial state and the whole log.
    """
    if snapshots is not None:
        data = await snapshots.get(tenant, session_id)
        found = decode(data, tenant, session_id) if data is not None else None
        if found is not None:
            # One read from the snapshot's own event on: the position it names must be an
            # event of this session's log, else the log was erased, or rebuilt with other
            # sequence numbers, since it was written (past the log's end, say).
            stored = await store.load(tenant, session_id, after=found.seq - 1)
            if stored and stored[0].seq == found.seq:
                return found.state, found.seq, stored[1:]
    return session.initial(), 0, await store.load(tenant, session_id)
