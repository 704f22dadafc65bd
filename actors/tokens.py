"""Counting tokens without a tokenizer download.

Exact counts depend on the upstream model's tokenizer, which Veil may not
have. This estimate is what budgets use. Against the SmolLM2 BPE tokenizer
(bench/token_estimate.py) the ratio estimate/real is, median [p10-p90]:
chat messages 1.08 [0.85-1.27], Markdown 0.81 [0.57-1.00], Python 0.94
[0.87-1.02]; over a whole chat history it is within 5-10%. So a budget may run
about 20% over on Markdown-heavy text: the default budget (half the context
window) leaves that headroom.
"""

from __future__ import annotations

from collections.abc import Iterable

from eventstore.events import ChatMessage

__all__ = ["MESSAGE_OVERHEAD", "estimate_message_tokens", "estimate_tokens", "message_tokens"]

# Chat templates wrap each message in a few tokens (role markers, separators).
MESSAGE_OVERHEAD = 4


def estimate_tokens(text: str) -> int:
    """About four characters a token for English prose; code and other scripts run denser."""
    if not text:
        return 0
    return (len(text) + 3) // 4


def message_tokens(message: ChatMessage) -> int:
    """One message's share of a prompt: its text and the template's wrapping."""
    return estimate_tokens(message.content) + MESSAGE_OVERHEAD


def estimate_message_tokens(messages: Iterable[ChatMessage]) -> int:
    return sum(map(message_tokens, messages))
