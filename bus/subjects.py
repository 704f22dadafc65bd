"""Every NATS subject Veil uses is built here, and only here.

Ids that become subject tokens are checked against a safe alphabet first
(DESIGN.md rule 6): nothing from a request reaches a subject unchecked.
"""

from __future__ import annotations

import re

__all__ = [
    "EVENTS_STREAM",
    "EVENTS_WILDCARD",
    "KB_STREAM",
    "KB_WILDCARD",
    "KEYS_BUCKET",
    "KNOWLEDGE_ADMIN",
    "KNOWLEDGE_SEARCH",
    "LIMITS_BUCKET",
    "MEMORY_FORGET",
    "MEMORY_RECALL",
    "ROUTER_ROUTE",
    "SESSION_CANCEL_WILDCARD",
    "SESSION_CMD_WILDCARD",
    "TOMBSTONES_STREAM",
    "TOMBSTONES_WILDCARD",
    "TOOLS_RUN",
    "USAGE_QUERY",
    "USAGE_SPEND",
    "InvalidToken",
    "collection_from_subject",
    "collection_subject",
    "direct_get",
    "is_valid_id",
    "model_generate",
    "model_generate_wildcard",
    "session_cancel",
    "session_cmd",
    "session_events",
    "session_from_cmd_subject",
    "session_from_events_subject",
    "session_out",
    "session_tombstone",
    "validate_id",
    "worker_leases",
]

EVENTS_STREAM = "CHAT_EVENTS"
EVENTS_WILDCARD = "chat.events.>"
TOMBSTONES_STREAM = "CHAT_TOMBSTONES"
TOMBSTONES_WILDCARD = "chat.tombstones.>"
SESSION_CMD_WILDCARD = "chat.session.*.cmd"
# Every turn's cancellation subject (see session_cancel).
SESSION_CANCEL_WILDCARD = "chat.session.*.cancel.*"

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


def session_events(session_id: str) -> str:
    """The subject a session's events are stored under in CHAT_EVENTS."""
    return f"chat.events.{validate_id(session_id, 'session id')}"


def session_tombstone(session_id: str) -> str:
    """Where the record that a session was deleted is kept, after its events are gone."""
    return f"chat.tombstones.{validate_id(session_id, 'session id')}"


def session_from_events_subject(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]


def session_cmd(session_id: str) -> str:
    """Commands to a session actor (request/reply, queue group of workers)."""
    return f"chat.session.{validate_id(session_id, 'session id')}.cmd"


def session_from_cmd_subject(subject: str) -> str:
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != "chat" or parts[1] != "session" or parts[3] != "cmd":
        raise InvalidToken(f"not a session command subject: {subject!r}")
    return validate_id(parts[2], "session id")


def session_out(session_id: str, turn_id: str) -> str:
    """Per-turn output: deltas, then a final done or error message."""
    return (
        f"chat.session.{validate_id(session_id, 'session id')}"
        f".out.{validate_id(turn_id, 'turn id')}"
    )


def session_cancel(session_id: str, turn_id: str) -> str:
    """The gateway publishes here when its client went away mid-turn."""
    return (
        f"chat.session.{validate_id(session_id, 'session id')}"
        f".cancel.{validate_id(turn_id, 'turn id')}"
    )


def model_generate(engine: str) -> str:
    """Generation requests for one configured engine (a queue group per engine)."""
    return f"model.{validate_id(engine, 'engine name')}.generate"


def model_generate_wildcard() -> str:
    return "model.*.generate"


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


def worker_leases(worker_id: str) -> str:
    """Where a worker answers whether it still runs a turn whose lease it holds."""
    return f"chat.worker.{validate_id(worker_id, 'worker id')}.leases"
