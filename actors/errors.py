"""Errors the actors raise to refuse a command.

ActorError
├── SessionNotFound     no such session for this tenant (the same for both cases)
├── SessionExists       a new session's id is already taken
├── NothingNew          the request adds no message to the conversation
├── UnknownToolCall     a tool message answers no tool call made just before it
├── IdempotencyMismatch an Idempotency-Key reused with a different request
├── RequestAbandoned    the client gave up before its turn could start
├── TurnInProgress      another writer holds the session's turn lease
├── ItemNotFound        a conversation item that does not exist (or was deleted)
├── ResponseNotFound    a turn to delete as a response that is not (or no longer) there
└── AlreadyHandled      the command id was seen before; carries its outcome
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actors.session import TurnOutcome

__all__ = [
    "ActorError",
    "AlreadyHandled",
    "IdempotencyMismatch",
    "ItemNotFound",
    "NothingNew",
    "RequestAbandoned",
    "ResponseNotFound",
    "SessionExists",
    "SessionNotFound",
    "TurnInProgress",
    "UnknownToolCall",
]


class ActorError(Exception):
    """Base of domain refusals."""

    status = 400
    code = "invalid_request"
    param: str | None = None


class SessionNotFound(ActorError):
    status = 404
    code = "session_not_found"


class SessionExists(ActorError):
    status = 409
    code = "session_exists"


class NothingNew(ActorError):
    status = 400
    code = "no_new_messages"


class UnknownToolCall(ActorError):
    status = 400
    code = "invalid_value"
    param = "messages"


class IdempotencyMismatch(ActorError):
    """The IETF Idempotency-Key draft answers a key reused with another payload with 422."""

    status = 422
    code = "idempotency_key_reused"


class RequestAbandoned(ActorError):
    """nginx's 499: the client closed the request before it was answered."""

    status = 499
    code = "client_gone"


class TurnInProgress(ActorError):
    status = 409
    code = "turn_in_progress"

    def __init__(self, turn_id: str, lease_until: datetime, holder: str | None = None) -> None:
        super().__init__(f"turn {turn_id} is in progress until {lease_until.isoformat()}")
        self.turn_id = turn_id
        self.lease_until = lease_until
        # The worker running it, to ask whether it still does (None: unknown, wait the lease out).
        self.holder = holder


class AlreadyHandled(ActorError):
    status = 200
    code = "already_handled"

    def __init__(self, turn_id: str, outcome: TurnOutcome | None) -> None:
        super().__init__(f"turn {turn_id} was already handled")
        self.turn_id = turn_id
        # None while the first delivery is still running.
        self.outcome = outcome


class ItemNotFound(ActorError):
    """A conversation item (a message of the history) that does not exist, or was deleted."""

    status = 404
    code = "item_not_found"


class ResponseNotFound(ActorError):
    """A response (a closed turn) that is not in the session, or was deleted."""

    status = 404
    code = "response_not_found"
