"""Counting tokens without a tokenizer download.

Exact counts depend on the upstream model's tokenizer, which Veil may not
have. This estimate is what budgets use; measured against the SmolLM2 BPE
tokenizer (see bench/token_estimate.py) it is within the figures that script
prints. Budgets leave headroom for the error.
"""

from __future__ import annotations

from collections.abc import Iterable

from eventstore.events import ChatMessage

__all__ = ["MESSAGE_OVERHEAD", "estimate_message_tokens", "estimate_tokens"]

# Chat templates wrap each message in a few tokens (role markers, separators).
MESSAGE_OVERHEAD = 4


def estimate_tokens(text: str) -> int:
    """About four characters a token for English prose; code and other scripts run denser."""
    if not text:
        return 0
    return (len(text) + 3) // 4


def estimate_message_tokens(messages: Iterable[ChatMessage]) -> int:
    return sum(estimate_tokens(m.content) + MESSAGE_OVERHEAD for m in messages)
