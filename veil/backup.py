"""`veil backup DIR` and `veil restore DIR`: Veil's streams through JetStream's own
snapshots, with a manifest that says what each file must be.

What a backup holds: the sources of truth, whole streams (`CHAT_EVENTS`, the log of every
session; `CHAT_TOMBSTONES`; `KB_EVENTS`, the knowledge base; `KV_VEIL_KEYS`, the managed
API keys). Snapshots, not the messages copied out: a restored stream keeps its config and
every sequence number (an erased message stays a gap), and the memory index, the usage
ledger and other sessions' records point at those sequences.

What it leaves out:
- `KV_VEIL_LIMITS`: the last 60 seconds of each key's requests and tokens, and the
  concurrency leases of requests running at that moment. Restored, those leases would
  hold slots of requests that no longer run until they lapse; the gateways make the
  bucket empty at start. The limits themselves live in the keys and the config, and the
  budgets are read from the usage ledger.
- The projections (`memory.sqlite`, `knowledge.sqlite`, `usage.db`): each rebuilds from
  the restored log, from its start, when no file of its own is found.

The event log is snapshotted before the tombstones: a session deleted while the backup
runs is then either whole in both (gone), or has its tombstone beside (part of) its
events, a deletion the restored server finishes when the session is next touched, as it
does after a crash half-way through one.

Restore verifies every file against the manifest (size, SHA-256, number of chunks) before
it touches the server, refuses a stream that exists (`--force` replaces Veil's streams
and drops the data directory's projections, which would describe another log), and checks
each restored stream's message count and last sequence against the manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from bus.connection import connect
from bus.subjects import (
    EVENTS_STREAM,
    KB_STREAM,
    KEYS_BUCKET,
    LIMITS_BUCKET,
    SNAPSHOTS_BUCKET,
    TOMBSTONES_STREAM,
)
from config import Config
from veil import __version__
from veil._snapshot import CHUNK_SIZE, SnapshotError, restore_stream, snapshot_stream

__all__ = [
    "STREAMS",
    "BackupError",
    "Manifest",
    "StreamBackup",
    "add_backup_parser",
    "backup",
    "backup_main",
    "restore",
    "restore_main",
    "verify",
]

# In the order they are snapshotted (the log before its tombstones: see above).
STREAMS = (EVENTS_STREAM, TOMBSTONES_STREAM, KB_STREAM, f"KV_{KEYS_BUCKET}")
LEFT_OUT = {
    f"KV_{LIMITS_BUCKET}": "rate-limit windows and concurrency leases: state of the moment, "
    "rebuilt empty at start",
}
# Caches of the log a restore replaces: dropped, so none outlives its log (a restored
# stream gives out the same sequence numbers again, which an old snapshot names).
CACHES = (f"KV_{SNAPSHOTS_BUCKET}",)
MANIFEST = "manifest.json"
FORMAT = 1
# A manifest is a few kilobytes; anything far larger is not one.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_READ = 1024 * 1024
# The files of the projections a data directory keeps, with SQLite's companions.
_SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


class BackupError(Exception):
    """A backup or restore refused or failed; the message says why, for an operator."""


class StreamBackup(msgspec.Struct, frozen=True, kw_only=True):
    """One stream's snapshot: where it is, what it must be, and the stream it came from."""

    name: str
    file: str
    bytes: int
    chunk_size: int
    chunks: int
    sha256: str
    messages: int
    first_seq: int
    last_seq: int
    config: dict[str, Any]
    state: dict[str, Any]


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    format: int
    veil_version: str
    nats_server: str
    created_at: datetime
    streams: list[StreamBackup]
    # Veil streams the server did not have (never used: no managed key yet, say).
    absent: list[str] = []
    left_out: dict[str, str] = {}


_MANIFEST_DECODER = msgspec.json.Decoder(Manifest)


def add_backup_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backup = sub.add_parser(
        "backup", help="snapshot Veil's streams (log, tombstones, knowledge, keys) into DIR"
    )
    backup.add_argument("directory", help="a new or empty directory")
    restore = sub.add_parser(
        "restore", help="restore a backup into this data directory (or VEIL_NATS_URL)"
    )
    restore.add_argument("directory", help="a directory written by `veil backup`")
    restore.add_argument(
        "--force",
        action="store_true",
        help="replace Veil's streams that exist, and drop this data directory's indexes",
    )
    for parser in (backup, restore):
        parser.add_argument(
            "--config", default=argparse.SUPPRESS, help="TOML config file (or VEIL_CONFIG)"
        )


def _file_of(stream: str) -> str:
    return f"{stream}.snapshot"


def _private_file(path: Path) -> int:
    """A new file only its owner may read or write (an existing one is refused)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _server_version(nc: Client) -> str:
    version = nc.connected_server_version
    return f"{version.major}.{version.minor}.{version.patch}"


async def _exists(nc: Client, stream: str) -> bool:
    try:
        await nc.jetstream().stream_info(stream)
    except nats.js.errors.NotFoundError:
        return False
    return True


def _prepare_directory(directory: Path) -> bool:
    """A new or empty directory, owner-only; True when this call made it."""
    if directory.exists():
        if not directory.is_dir():
            raise BackupError(f"{directory} is not a directory")
        if any(directory.iterdir()):
            raise BackupError(f"{directory} is not empty: back up into a new or empty directory")
        directory.chmod(0o700)
        return False
    directory.mkdir(parents=True, mode=0o700)
    directory.chmod(0o700)  # mkdir's mode passes through the umask
    return True


async def backup(nc: Client, directory: Path) -> Manifest:
    """Snapshot every Veil stream into `directory` (new or empty), the manifest last;
    on failure, remove what this call wrote."""
    made = _prepare_directory(directory)
    written: list[Path] = []
    try:
        entries: list[StreamBackup] = []
        absent: list[str] = []
        for stream in STREAMS:
            if not await _exists(nc, stream):
                absent.append(stream)
                continue
            path = directory / _file_of(stream)
            written.append(path)
            with os.fdopen(_private_file(path), "wb") as out:
                taken = await snapshot_stream(nc, stream, out, chunk_size=CHUNK_SIZE)
                out.flush()
                os.fsync(out.fileno())
            state = taken.state
            entries.append(
                StreamBackup(
                    name=stream,
                    file=path.name,
                    bytes=taken.size,
                    chunk_size=CHUNK_SIZE,
                    chunks=taken.chunks,
                    sha256=taken.sha256,
                    messages=int(state.get("messages", 0)),
                    first_seq=int(state.get("first_seq", 0)),
                    last_seq=int(state.get("last_seq", 0)),
                    config=taken.config,
                    state=state,
                )
            )
        if EVENTS_STREAM in absent:
            raise BackupError(
                f"no Veil event log ({EVENTS_STREAM}) in this NATS: nothing to back up"
            )
        manifest = Manifest(
            format=FORMAT,
            veil_version=__version__,
            nats_server=_server_version(nc),
            created_at=datetime.now(UTC),
            streams=entries,
            absent=absent,
            left_out=LEFT_OUT,
        )
        path = directory / MANIFEST
        written.append(path)
        with os.fdopen(_private_file(path), "wb") as out:
            out.write(msgspec.json.format(msgspec.json.encode(manifest)) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        _sync_directory(directory)
        return manifest
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        if made:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(_READ):
            digest.update(block)
    return digest.hexdigest()


def verify(directory: Path) -> Manifest:
    """The backup's manifest, once every file it names is as it says (read in full)."""
    path = directory / MANIFEST
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BackupError(f"{directory} is not a Veil backup: it has no {MANIFEST}") from None
    if size > MAX_MANIFEST_BYTES:
        raise BackupError(f"{path} is {size} bytes: not a manifest")
    try:
        manifest = _MANIFEST_DECODER.decode(path.read_bytes())
    except msgspec.DecodeError as error:
        raise BackupError(f"{path} is not a Veil backup manifest: {error}") from error
    if manifest.format != FORMAT:
        raise BackupError(f"{path}: backup format {manifest.format}, this Veil reads {FORMAT}")
    names = [entry.name for entry in manifest.streams]
    if EVENTS_STREAM not in names or len(set(names)) != len(names):
        raise BackupError(f"{path}: the streams must include {EVENTS_STREAM}, each once")
    for entry in manifest.streams:
        if entry.name not in STREAMS:
            raise BackupError(f"{path}: {entry.name} is not one of Veil's streams")
        if entry.file != _file_of(entry.name) or entry.config.get("name") != entry.name:
            raise BackupError(f"{path}: {entry.name}'s file or config names another stream")
        if not 1024 <= entry.chunk_size <= 1024 * 1024 or entry.bytes < 1:
            raise BackupError(f"{path}: {entry.name}'s sizes are out of range")
        if entry.chunks != math.ceil(entry.bytes / entry.chunk_size):
            raise BackupError(
                f"{path}: {entry.name} says {entry.chunks} chunks of up to {entry.chunk_size} "
                f"bytes for {entry.bytes} bytes"
            )
        snapshot = directory / entry.file
        try:
            found = snapshot.stat().st_size
        except FileNotFoundError:
            raise BackupError(f"{snapshot} is missing") from None
        if found != entry.bytes:
            raise BackupError(f"{snapshot} has {found} bytes, the manifest says {entry.bytes}")
        if _sha256_of(snapshot) != entry.sha256:
            raise BackupError(f"{snapshot} is not the file that was backed up (SHA-256 differs)")
    return manifest


def projection_files(config: Config) -> list[Path]:
    """The data directory's projections (memory, knowledge, usage) that exist."""
    from veil.memory_role import index_path
    from veil.usage_role import ledger_path

    memory = index_path(config)
    bases = (memory, memory.parent / "knowledge.sqlite", ledger_path(config))
    candidates = (
        base.with_name(base.name + suffix) for base in bases for suffix in _SQLITE_SUFFIXES
    )
    return [path for path in candidates if path.exists()]


async def restore(nc: Client, directory: Path, manifest: Manifest, *, force: bool) -> list[str]:
    """Restore the verified backup's streams; the streams replaced (with `force`) and the
    caches dropped."""
    existing = [stream for stream in STREAMS if await _exists(nc, stream)]
    if existing and not force:
        raise BackupError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''} here: "
            "restore into a fresh data directory (or a NATS without Veil's streams), or pass "
            "--force to replace them"
        )
    if nc.max_payload and any(e.chunk_size > nc.max_payload for e in manifest.streams):
        raise BackupError(f"this NATS takes messages of at most {nc.max_payload} bytes")
    js = nc.jetstream()
    caches = [stream for stream in CACHES if await _exists(nc, stream)]
    for stream in [*existing, *caches]:
        # Every Veil stream, not only the backup's: what is restored is the backup, whole.
        await js.delete_stream(stream)
    for entry in manifest.streams:
        with (directory / entry.file).open("rb") as source:
            done = await restore_stream(
                nc, entry.config, entry.state, source, chunk_size=entry.chunk_size
            )
        if done.chunks != entry.chunks:
            raise BackupError(
                f"{entry.name}: sent {done.chunks} chunks, the manifest says {entry.chunks}"
            )
        got = (int(done.state.get("messages", -1)), int(done.state.get("last_seq", -1)))
        if got != (entry.messages, entry.last_seq):
            raise BackupError(
                f"{entry.name} was restored with {got[0]} messages up to sequence {got[1]}, "
                f"the backup had {entry.messages} up to {entry.last_seq}"
            )
    return [*existing, *caches]


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _describe(entry: StreamBackup) -> str:
    return (
        f"  {entry.name}: {_count(entry.messages, 'message')} (last sequence {entry.last_seq}), "
        f"{_size(entry.bytes)} in {_count(entry.chunks, 'chunk')}"
    )


Connection = Callable[[], AbstractAsyncContextManager[str]]


async def backup_main(directory: Path, connection: Connection) -> int:
    """`veil backup DIR`, against the URL `connection` gives (the running server's, or a
    nats-server started on the stopped data directory for the while)."""
    started = time.perf_counter()
    try:
        # Refused before any nats-server is started for it (backup() checks again).
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise BackupError(f"{directory} is not empty: back up into a new or empty directory")
        async with connection() as url:
            nc = await connect(url, name="veil-backup")
            try:
                manifest = await backup(nc, directory)
            finally:
                await nc.drain()
    except (BackupError, SnapshotError, OSError, nats.errors.Error) as error:
        print(f"veil backup: {error}", file=sys.stderr)
        return 1
    total = sum(entry.bytes for entry in manifest.streams)
    print(f"Backed up {_count(len(manifest.streams), 'stream')} into {directory}:")
    for entry in manifest.streams:
        print(_describe(entry))
    print(
        f"{_size(total)} in {time.perf_counter() - started:.2f} s; left out: {', '.join(LEFT_OUT)}"
    )
    return 0


async def restore_main(config: Config, directory: Path, force: bool, connection: Connection) -> int:
    """`veil restore DIR [--force]` into the configured NATS, or this data directory's."""
    from veil.memory_role import lock_indexes
    from veil.usage_role import lock_ledger

    started = time.perf_counter()
    locks: list[int] = []
    try:
        manifest = verify(directory)
        # No Veil may run on this data directory: its projections would follow another log.
        for lock in (lock_indexes(config), lock_ledger(config)):
            if lock is None:
                raise BackupError(f"a Veil is running on {config.data_dir}: stop it first")
            locks.append(lock)
        stale = projection_files(config)
        if stale and not force:
            raise BackupError(
                f"{config.data_dir} holds indexes of another log "
                f"({', '.join(p.name for p in stale)}): restore into a fresh data directory, "
                "or pass --force to drop them"
            )
        for path in stale:
            path.unlink()  # they rebuild from the restored log at the next start
        async with connection() as url:
            nc = await connect(url, name="veil-restore")
            try:
                replaced = await restore(nc, directory, manifest, force=force)
            finally:
                await nc.drain()
    except (BackupError, SnapshotError, OSError, nats.errors.Error) as error:
        print(f"veil restore: {error}", file=sys.stderr)
        return 1
    finally:
        for lock in locks:
            os.close(lock)
    taken = f"{manifest.created_at:%Y-%m-%d %H:%M:%S} UTC"
    print(
        f"Restored {_count(len(manifest.streams), 'stream')} from {directory} (backed up {taken}):"
    )
    for entry in manifest.streams:
        print(_describe(entry))
    if replaced:
        print(
            f"Replaced: {', '.join(replaced)}; the indexes rebuild from the log at the next start."
        )
    print(f"Done in {time.perf_counter() - started:.2f} s.")
    return 0
