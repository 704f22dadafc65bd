"""The prompt that asks the model to fold old turns into its running summary."""

from __future__ import annotations

from collections.abc import Sequence

from eventstore.events import ChatMessage

__all__ = ["facts_prompt", "parse_facts", "summary_prompt"]

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


FACTS_INSTRUCTIONS = (
    "Extract lasting facts about the user from the exchange below: names, dates, "
    "numbers, preferences, plans, people, places. One fact per line, each a short "
    'self-contained sentence in the third person ("The user\'s ..."). Write NONE if '
    "there is nothing worth remembering. Write nothing else."
)
MAX_FACTS = 8


def facts_prompt(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    transcript = "\n".join(f"{m.role}: {m.content}" for m in messages)
    return [
        ChatMessage(role="system", content=FACTS_INSTRUCTIONS),
        ChatMessage(role="user", content=transcript),
    ]


def parse_facts(answer: str) -> list[str]:
    """The model's lines as facts: bullets stripped, NONE and blanks dropped, at most MAX_FACTS."""
    facts = []
    for line in answer.splitlines():
        fact = line.strip().lstrip("-*•0123456789.) ").strip()
        if fact and fact.upper().rstrip(".") != "NONE":
            facts.append(fact)
    return facts[:MAX_FACTS]
