"""Event store errors.

EventStoreError
├── ConcurrencyConflict   the session moved on since it was read
└── StoreUnavailable      the backing store cannot be reached
"""

from __future__ import annotations

__all__ = ["ConcurrencyConflict", "EventStoreError", "StoreUnavailable"]


class EventStoreError(Exception):
    """Base of event store errors."""


class ConcurrencyConflict(EventStoreError):
    """An append's expected last sequence did not match: reload and decide again."""

    def __init__(self, session_id: str, expected: int) -> None:
        super().__init__(f"session {session_id!r} moved past sequence {expected}")
        self.session_id = session_id
        self.expected = expected


class StoreUnavailable(EventStoreError):
    """The store could not be reached or did not answer in time."""
