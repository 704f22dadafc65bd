"""Conversations recognised by their history: what the key-value bucket VEIL_HISTORIES holds.

A client of a stateless API (Anthropic's Messages) resends its whole conversation each
time. Every gateway records, for the conversation as that client will resend it, which
session holds it (edge/history_index.py): `h.<digest>` names the session and how many
turns it had then, so a stale entry (the session went on since) is told from a live
one. `c.<command id>` keeps what a request under an Idempotency-Key was resolved to,
so that its retry is the same command on the same session. Entries hold digests and
ids, never text, and lapse on their own (the bucket's TTL).
"""

from __future__ import annotations

import msgspec

from bus.codec import Codec

__all__ = ["HISTORY_ENTRY_CODEC", "HistoryEntry"]


class HistoryEntry(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A session whose conversation, as its client sees it, has a given digest."""

    session_id: str
    # The session's turns (completed, failed or cancelled) when it had that conversation.
    turns: int
    # Messages of the resent conversation the session already held (for `c.` entries).
    held: int = 0


HISTORY_ENTRY_CODEC: Codec[HistoryEntry] = Codec(HistoryEntry)
