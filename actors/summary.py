"""The prompt that asks the model to fold old turns into its running summary."""

from __future__ import annotations

from collections.abc import Sequence

from eventstore.events import ChatMessage

__all__ = ["summary_prompt"]

INSTRUCTIONS = (
    "You keep the memory of a long conversation between a user and an assistant. "
    "Write a new summary that merges the previous summary with the new messages. "
    "Keep every fact about the user (names, preferences, numbers, dates, decisions), "
    "what was asked and answered, and anything still open. Be concise; use short "
    "bullet points; write nothing but the summary."
)


def summary_prompt(previous: str | None, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    transcript = "\n".join(f"{m.role}: {m.content}" for m in messages)
    body = f"Previous summary:\n{previous or '(none)'}\n\nNew messages:\n{transcript}"
    return [
        ChatMessage(role="system", content=INSTRUCTIONS),
        ChatMessage(role="user", content=body),
    ]
