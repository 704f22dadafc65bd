"""JetStream's stream snapshot and restore, spoken as nats-server serves them
(`jsStreamSnapshotRequest`, `streamSnapshot`, `processStreamRestore` in its
server/jetstream_api.go; `nats stream backup` and `restore` speak the same).

Snapshot: a request to `$JS.API.STREAM.SNAPSHOT.<stream>` names a deliver subject and a
chunk size; the answer carries the stream's config and state, and the server then sends
the snapshot (an S2-compressed tar of the stream's files, point-in-time) there in chunks.
Each full chunk comes with a reply subject, `$JS.SNAPSHOT.ACK.<stream>.<id>.<size>.<index>`,
that is its flow control: the server keeps a window of unacknowledged chunks and gives up
after 5 s without an ack (status 408 "No Flow Response"). The last, short chunk has no
reply; an empty message ends the stream of chunks, its status saying how it ended (204,
or none at all when the whole snapshot fit in one chunk; 408 or 500 with a reason).

Restore: a request to `$JS.API.STREAM.RESTORE.<stream>` with that config and state answers
with a subject for the chunks. Each chunk goes as a request, which the server answers
empty once it has taken it (or with an error); an empty request ends the transfer, and
its answer is the new stream's info or why it failed. The server gives up on a restore
that gets no chunk for 5 s. A stream that exists is refused.

The `$JS.API` subjects are built here: they are JetStream's, and only these two commands
use them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, BinaryIO

import msgspec
import nats.errors
from nats.aio.client import Client

from bus.codec import Codec
from bus.requests import nats_request

__all__ = [
    "CHUNK_SIZE",
    "RestoreResult",
    "SnapshotError",
    "SnapshotResult",
    "restore_stream",
    "snapshot_stream",
]

# The server's default, within its 1 KiB - 1 MiB range; far below any max_payload.
CHUNK_SIZE = 128 * 1024
# Seconds to wait for the next chunk, or for the server's answer to one.
CHUNK_TIMEOUT = 30.0
# Seconds the server may take to open the restored stream after the last chunk.
FINISH_TIMEOUT = 300.0


class SnapshotError(Exception):
    """The server refused, or the transfer broke; the message says which and why."""


class _ApiError(msgspec.Struct, frozen=True):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _SnapshotReply(msgspec.Struct, frozen=True):
    error: _ApiError | None = None
    config: dict[str, Any] | None = None
    state: dict[str, Any] | None = None


class _RestoreReply(msgspec.Struct, frozen=True):
    error: _ApiError | None = None
    deliver_subject: str = ""


class _CreateReply(msgspec.Struct, frozen=True):
    error: _ApiError | None = None
    state: dict[str, Any] | None = None


_SNAPSHOT_REPLY: Codec[_SnapshotReply] = Codec(_SnapshotReply)
_RESTORE_REPLY: Codec[_RestoreReply] = Codec(_RestoreReply)
_CREATE_REPLY: Codec[_CreateReply] = Codec(_CreateReply)


class SnapshotResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a snapshot was: the stream's config and state at that moment, and its bytes."""

    config: dict[str, Any]
    state: dict[str, Any]
    size: int
    chunks: int
    sha256: str


class RestoreResult(msgspec.Struct, frozen=True, kw_only=True):
    """The restored stream's state, and how many chunks were sent."""

    state: dict[str, Any]
    chunks: int


def _refusal(error: _ApiError, what: str) -> SnapshotError:
    return SnapshotError(f"{what}: {error.description} (error {error.err_code or error.code})")


def _decode(codec: Codec[Any], data: bytes, what: str) -> Any:
    try:
        return codec.decode(data)
    except msgspec.DecodeError as error:
        raise SnapshotError(f"{what}: the server's answer is not understood: {error}") from error


async def snapshot_stream(
    nc: Client, stream: str, out: BinaryIO, *, chunk_size: int = CHUNK_SIZE
) -> SnapshotResult:
    """Write a snapshot of `stream` (without consumers) to `out`, checking each chunk's
    size and place against what the server says it sent."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.flush()  # the server sends only to a subject someone listens on
        request = {"deliver_subject": inbox, "no_consumers": True, "chunk_size": chunk_size}
        try:
            answer = await nats_request(
                nc,
                f"$JS.API.STREAM.SNAPSHOT.{stream}",
                json.dumps(request).encode(),
                timeout=CHUNK_TIMEOUT,
            )
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as error:
            raise SnapshotError(f"snapshot of {stream}: JetStream did not answer") from error
        reply: _SnapshotReply = _decode(_SNAPSHOT_REPLY, answer.data, f"snapshot of {stream}")
        if reply.error is not None:
            raise _refusal(reply.error, f"snapshot of {stream}")
        if reply.config is None or reply.state is None:
            raise SnapshotError(f"snapshot of {stream}: the answer has no config or state")
        digest = hashlib.sha256()
        size = chunks = 0
        short = False  # a short chunk must be the last one
        while True:
            try:
                msg = await sub.next_msg(timeout=CHUNK_TIMEOUT)
            except nats.errors.TimeoutError as error:
                raise SnapshotError(
                    f"snapshot of {stream}: no chunk for {CHUNK_TIMEOUT:.0f} s after {chunks}"
                ) from error
            if not msg.data:
                status = (msg.headers or {}).get("Status")
                if status not in (None, "204"):
                    reason = (msg.headers or {}).get("Description", "")
                    raise SnapshotError(f"snapshot of {stream} failed: {status} {reason}".rstrip())
                break
            # Every chunk is full but the last: what lets a restore count them again.
            full = len(msg.data) == chunk_size
            if short or len(msg.data) > chunk_size or (msg.reply and not full):
                raise SnapshotError(f"snapshot of {stream}: chunk {chunks + 1} is out of place")
            chunks += 1
            if msg.reply:
                # `...<size>.<index>`: what the server sent, to compare with what came.
                if msg.reply.rsplit(".", 2)[1:] != [str(len(msg.data)), str(chunks)]:
                    raise SnapshotError(
                        f"snapshot of {stream}: chunk {chunks} ({len(msg.data)} bytes) does not "
                        f"match what the server sent ({msg.reply})"
                    )
            else:
                short = True
            out.write(msg.data)
            digest.update(msg.data)
            size += len(msg.data)
            if msg.reply:
                await nc.publish(msg.reply, b"")
    finally:
        await sub.unsubscribe()
    if chunks == 0:
        raise SnapshotError(f"snapshot of {stream}: the server sent nothing")
    return SnapshotResult(
        config=reply.config,
        state=reply.state,
        size=size,
        chunks=chunks,
        sha256=digest.hexdigest(),
    )


async def restore_stream(
    nc: Client,
    config: dict[str, Any],
    state: dict[str, Any],
    source: BinaryIO,
    *,
    chunk_size: int,
) -> RestoreResult:
    """Create the stream that `config` names from the snapshot read from `source`, sent in
    pieces of `chunk_size` bytes; its state once restored."""
    stream = str(config.get("name", ""))
    what = f"restore of {stream}"
    try:
        answer = await nats_request(
            nc,
            f"$JS.API.STREAM.RESTORE.{stream}",
            json.dumps({"config": config, "state": state}).encode(),
            timeout=CHUNK_TIMEOUT,
        )
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as error:
        raise SnapshotError(f"{what}: JetStream did not answer") from error
    reply: _RestoreReply = _decode(_RESTORE_REPLY, answer.data, what)
    if reply.error is not None:
        raise _refusal(reply.error, what)
    if not reply.deliver_subject:
        raise SnapshotError(f"{what}: the server named no subject for the chunks")
    chunks = 0
    try:
        while chunk := source.read(chunk_size):
            chunks += 1
            taken = await nats_request(nc, reply.deliver_subject, chunk, timeout=CHUNK_TIMEOUT)
            if taken.data:  # an empty answer takes the chunk; anything else is why not
                failed: _CreateReply = _decode(_CREATE_REPLY, taken.data, what)
                raise _refusal(failed.error or _ApiError(description="refused"), what)
        done = await nats_request(nc, reply.deliver_subject, b"", timeout=FINISH_TIMEOUT)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as error:
        raise SnapshotError(
            f"{what}: the server stopped answering after {chunks} chunks"
        ) from error
    created: _CreateReply = _decode(_CREATE_REPLY, done.data, what)
    if created.error is not None:
        raise _refusal(created.error, what)
    if created.state is None:
        raise SnapshotError(f"{what}: the answer has no state")
    return RestoreResult(state=created.state, chunks=chunks)
