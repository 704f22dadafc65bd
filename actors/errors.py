"""Errors the actors raise to refuse a command.

ActorError
├── SessionNotFound    no such session for this tenant (the same for both cases)
├── SessionExists      a new session's id is already taken
├── NothingNew         the request adds no message to the conversation
├── TurnInProgress     another writer holds the session's turn lease
└── AlreadyHandled     the command id was seen before; carries its outcome
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actors.session import TurnOutcome

__all__ = [
    "ActorError",
    "AlreadyHandled",
    "NothingNew",
    "SessionExists",
    "SessionNotFound",
    "TurnInProgress",
]


class ActorError(Exception):
    """Base of domain refusals."""

    status = 400
    code = "invalid_request"


class SessionNotFound(ActorError):
    status = 404
    code = "session_not_found"


class SessionExists(ActorError):
    status = 409
    code = "session_exists"


class NothingNew(ActorError):
    status = 400
    code = "no_new_messages"


class TurnInProgress(ActorError):
    status = 409
    code = "turn_in_progress"

    def __init__(self, turn_id: str, lease_until: datetime) -> None:
        super().__init__(f"turn {turn_id} is in progress until {lease_until.isoformat()}")
        self.turn_id = turn_id
        self.lease_until = lease_until


class AlreadyHandled(ActorError):
    status = 200
    code = "already_handled"

    def __init__(self, turn_id: str, outcome: TurnOutcome | None) -> None:
        super().__init__(f"turn {turn_id} was already handled")
        self.turn_id = turn_id
        # None while the first delivery is still running.
        self.outcome = outcome
