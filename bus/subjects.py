"""Every NATS subject Veil uses is built here, and only here.

Ids that become subject tokens are checked against a safe alphabet first
(DESIGN.md rule 6): nothing from a request reaches a subject unchecked.
"""

from __future__ import annotations

import re
import zlib

__all__ = [
    "EVENTS_STREAM",
    "EVENTS_WILDCARD",
    "HISTORIES_BUCKET",
    "KB_STREAM",
    "KB_WILDCARD",
    "KEYS_BUCKET",
    "KNOWLEDGE_ADMIN",
    "KNOWLEDGE_SEARCH",
    "LEGACY_EVENTS_WILDCARD",
    "LIMITS_BUCKET",
    "MEMORY_FORGET",
    "MEMORY_RECALL",
    "MODEL_JOBS",
    "PARTITIONS",
    "PLACEMENT_SESSIONS",
    "ROUTER_ROUTE",
    "SESSION_CANCEL_WILDCARD",
    "SESSION_CMD_WILDCARD",
    "SNAPSHOTS_BUCKET",
    "TOMBSTONES_STREAM",
    "TOMBSTONES_WILDCARD",
    "TOOLS_RUN",
    "TURNS_WHERE",
    "USAGE_QUERY",
    "USAGE_SPEND",
    "InvalidToken",
    "collection_from_subject",
    "collection_subject",
    "direct_get",
    "is_valid_id",
    "legacy_session_events",
    "legacy_session_tombstone",
    "model_generate",
    "model_generate_wildcard",
    "partition_of",
    "session_cancel",
    "session_cmd",
    "session_cmd_placed",
    "session_events",
    "session_events_of_any_tenant",
    "session_from_events_subject",
    "session_key",
    "session_key_from_cmd_subject",
    "session_out",
    "session_partition_wildcard",
    "session_tombstone",
    "split_session_key",
    "stream_info",
    "validate_id",
    "worker_leases",
]

EVENTS_STREAM = "CHAT_EVENTS"
EVENTS_WILDCARD = "chat.events.>"
# Logs written before sessions were per tenant (one token: chat.events.<sid>); read only.
LEGACY_EVENTS_WILDCARD = "chat.events.*"
TOMBSTONES_STREAM = "CHAT_TOMBSTONES"
TOMBSTONES_WILDCARD = "chat.tombstones.>"
SESSION_CMD_WILDCARD = "chat.session.*.*.cmd"
# Every turn's cancellation subject (see session_cancel).
SESSION_CANCEL_WILDCARD = "chat.session.*.*.cancel.*"

MAX_ID_LENGTH = 128
_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


class InvalidToken(ValueError):
    """An id that may not become a subject token."""


def is_valid_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def validate_id(value: str, what: str = "id") -> str:
    if not is_valid_id(value):
        raise InvalidToken(f"{what} must be 1-{MAX_ID_LENGTH} characters from [A-Za-z0-9_-]")
    return value


# A session is named within its tenant: its identity is (tenant, session id), written
# as two tokens, `<tenant>.<session id>`, in every subject of the session. Two tenants
# may use the same name and never share a subject; an operator still reads both in
# `nats sub 'chat.session.acme.>'` or `nats stream view CHAT_EVENTS`. Both tokens are
# at most 128 characters, so the longest subject (a turn's output) stays under 420.


def session_key(tenant: str, session_id: str) -> str:
    """A session's identity as one string: its actor's key and the stem of its subjects."""
    return f"{validate_id(tenant, 'tenant')}.{validate_id(session_id, 'session id')}"


def split_session_key(key: str) -> tuple[str, str]:
    """(tenant, session id) of a session_key."""
    tenant, _, session_id = key.partition(".")
    return validate_id(tenant, "tenant"), validate_id(session_id, "session id")


def session_events(tenant: str, session_id: str) -> str:
    """The subject a session's events are stored under in CHAT_EVENTS."""
    return f"chat.events.{session_key(tenant, session_id)}"


def session_events_of_any_tenant(session_id: str) -> str:
    """A filter for the logs of every tenant's session of this id (for operators' commands)."""
    return f"chat.events.*.{validate_id(session_id, 'session id')}"


def legacy_session_events(session_id: str) -> str:
    """Where a session opened before sessions were per tenant keeps its events (and its
    later ones: it is continued there, so the log's sequences never change)."""
    return f"chat.events.{validate_id(session_id, 'session id')}"


def session_from_events_subject(subject: str) -> tuple[str | None, str] | None:
    """(tenant, session id) of a CHAT_EVENTS subject, None if it is none; the tenant is
    None on a legacy subject (the session's own log says whose it is)."""
    tokens = subject.split(".")
    if tokens[:2] != ["chat", "events"] or not all(map(is_valid_id, tokens[2:])):
        return None
    if len(tokens) == 4:
        return tokens[2], tokens[3]
    return (None, tokens[2]) if len(tokens) == 3 else None


def session_tombstone(tenant: str, session_id: str) -> str:
    """Where the record that a session was deleted is kept, after its events are gone."""
    return f"chat.tombstones.{session_key(tenant, session_id)}"


def legacy_session_tombstone(session_id: str) -> str:
    """Where a deletion was recorded before sessions were per tenant; read only."""
    return f"chat.tombstones.{validate_id(session_id, 'session id')}"


def session_cmd(tenant: str, session_id: str) -> str:
    """Commands to a session actor (request/reply, queue group of workers)."""
    return f"chat.session.{session_key(tenant, session_id)}.cmd"


# Session commands are also split into partitions, each served by one worker while the
# workers' membership holds (bus/placement.py), so a session's turns reach the worker
# that already holds its actor. A fixed count: gateways and workers must agree on it.
PARTITIONS = 64
# Session workers' heartbeats (bus/placement.py).
PLACEMENT_SESSIONS = "chat.placement.sessions"


def partition_of(tenant: str, session_id: str) -> int:
    """The partition of a session: CRC-32 of its key (stable across processes and
    versions, unlike Python's hash)."""
    return zlib.crc32(session_key(tenant, session_id).encode()) % PARTITIONS


def session_cmd_placed(tenant: str, session_id: str) -> str:
    """Commands to a session actor through its partition: `<session_cmd>.<partition>`."""
    return f"{session_cmd(tenant, session_id)}.{partition_of(tenant, session_id)}"


def session_partition_wildcard(partition: int) -> str:
    """Every session command of one partition: what the worker serving it subscribes to."""
    if not 0 <= partition < PARTITIONS:
        raise ValueError(f"partition {partition} is not in 0-{PARTITIONS - 1}")
    return f"{SESSION_CMD_WILDCARD}.{partition}"


def session_key_from_cmd_subject(subject: str) -> str:
    """The session_key of a command subject, placed or not: the key of the actor that
    serves it."""
    parts = subject.split(".")
    if len(parts) not in (5, 6) or parts[0] != "chat" or parts[1] != "session" or parts[4] != "cmd":
        raise InvalidToken(f"not a session command subject: {subject!r}")
    return session_key(parts[2], parts[3])


def session_out(tenant: str, session_id: str, turn_id: str) -> str:
    """Per-turn output: deltas, then a final done or error message."""
    return f"chat.session.{session_key(tenant, session_id)}.out.{validate_id(turn_id, 'turn id')}"


def session_cancel(tenant: str, session_id: str, turn_id: str) -> str:
    """The gateway publishes here when its client went away mid-turn."""
    return (
        f"chat.session.{session_key(tenant, session_id)}.cancel.{validate_id(turn_id, 'turn id')}"
    )


def model_generate(engine: str) -> str:
    """Generation requests for one configured engine (a queue group per engine)."""
    return f"model.{validate_id(engine, 'engine name')}.generate"


def model_generate_wildcard() -> str:
    return "model.*.generate"


# Who runs a generation (every model actor listens; only the one running it answers).
MODEL_JOBS = "model.jobs"


# The tool actor: runs server-side tools.
TOOLS_RUN = "tools.run"

# The router actor: which pipeline answers a turn.
ROUTER_ROUTE = "router.route"

# The memory actor's requests: recall for a turn, and forgetting a deleted session.
MEMORY_RECALL = "memory.recall"
MEMORY_FORGET = "memory.forget"

# The usage ledger's requests: usage grouped for reports, and spend totals for budgets.
USAGE_QUERY = "usage.query"
USAGE_SPEND = "usage.spend"

# The knowledge actor's requests: search for a turn or a tool, and the admin endpoints'.
KNOWLEDGE_SEARCH = "knowledge.search"
KNOWLEDGE_ADMIN = "knowledge.admin"

# The knowledge log: one subject per collection in the KB_EVENTS stream.
KB_STREAM = "KB_EVENTS"
# API keys managed at run time: a JetStream key-value bucket, one entry per key id.
KEYS_BUCKET = "VEIL_KEYS"
# Rate limits shared by every gateway: a key-value bucket, one entry per key or tenant.
LIMITS_BUCKET = "VEIL_LIMITS"
# Which session holds a conversation that a client resends whole (the Anthropic door).
HISTORIES_BUCKET = "VEIL_HISTORIES"
# Session snapshots (a cache of folded state, never the truth): one entry per session,
# keyed by its session_key.
SNAPSHOTS_BUCKET = "VEIL_SNAPSHOTS"
KB_WILDCARD = "kb.events.>"
_KB_PREFIX = "kb.events."


def collection_subject(collection: str) -> str:
    """The subject a collection's events are stored under."""
    return _KB_PREFIX + validate_id(collection, "collection name")


def collection_from_subject(subject: str) -> str:
    return subject.removeprefix(_KB_PREFIX)


def direct_get(stream: str) -> str:
    """JetStream's direct get API of a stream (allow_direct): reads without a consumer."""
    return f"$JS.API.DIRECT.GET.{stream}"


def stream_info(stream: str) -> str:
    """JetStream's stream info API (a subjects filter lists the stream's subjects)."""
    return f"$JS.API.STREAM.INFO.{stream}"


# Which worker has a turn in hand, queued or running (every worker listens; only one
# that has it answers): a gateway waiting on a turn whose worker died stops waiting.
TURNS_WHERE = "chat.turns.where"


def worker_leases(worker_id: str) -> str:
    """Where a worker answers whether it still runs a turn whose lease it holds."""
    return f"chat.worker.{validate_id(worker_id, 'worker id')}.leases"
