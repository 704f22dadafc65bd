"""What a memory item says: a turn's messages and its reply as one text, cut to size.

Pure (the projector, the prompt builder and the audit use it); see
`actors.memory.projector` for why a turn is one item and why items are capped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from eventstore.events import (
    ChatMessage,
    EventUnion,
    FactsExtracted,
    ReplyCompleted,
    TurnCancelled,
    TurnFailed,
    TurnStarted,
)

__all__ = [
    "ITEM_TOKENS",
    "REMEMBERED_ROLES",
    "exchange",
    "item_text",
    "parts",
    "said",
    "started_of",
]

REMEMBERED_ROLES = frozenset({"user", "assistant"})

#: Tokens (`actors.tokens.estimate_tokens`: four characters a token) an item holds at most.
ITEM_TOKENS = 150
_ITEM_CHARS = ITEM_TOKENS * 4


def said(message: ChatMessage) -> str:
    """A message as a memory keeps it: with its speaker's name first when the client
    named one (OpenAI's `name`, as a transcript of several people carries it), and an
    unnamed assistant message marked as the assistant's.

    Questions about people name them ("When did Maya move?") while their own lines
    never do: without the name, the nearest items were the greetings addressed to
    them (bench/long_memory_eval.py --items: recall@10 0.37 -> 0.61 with names).
    """
    name = (message.name or "").strip()
    if name:
        return f"{name}: {message.content}"
    return f"Assistant: {message.content}" if message.role == "assistant" else message.content


def exchange(asked: Sequence[ChatMessage], reply: str) -> str:
    """A turn as one text: its remembered messages, one a line, then the reply."""
    lines = [said(m) for m in asked if m.role in REMEMBERED_ROLES and m.content.strip()]
    if reply.strip():
        lines.append(f"Assistant: {reply}")
    return "\n".join(lines)


def parts(text: str, limit: int = _ITEM_CHARS) -> list[str]:
    """`text` cut into consecutive pieces of at most `limit` characters, at a space
    or line break where one is in the second half of the piece."""
    out: list[str] = []
    text = text.strip()
    while len(text) > limit:
        cut = max(text.rfind(" ", limit // 2, limit + 1), text.rfind("\n", limit // 2, limit + 1))
        cut = cut if cut > 0 else limit
        out.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    if text:
        out.append(text)
    return out


def item_text(events: Mapping[int, EventUnion], seq: int) -> str | None:
    """The whole text of the memory made from the event at `seq` of one session's log
    (`events`: that log by position), for an audit that resolves a reference."""
    event = events.get(seq)
    match event:
        case ReplyCompleted() | TurnFailed() | TurnCancelled():
            started = started_of(events.values(), event.turn_id)
            asked = started.messages if started is not None else []
            reply = event.content if isinstance(event, ReplyCompleted) else ""
            return exchange(asked, reply) or None
        case FactsExtracted():
            return "\n".join(event.facts) or None
        case TurnStarted():
            # A record of an index made before turns were items (one a message).
            return next((m.content for m in event.messages if m.role in REMEMBERED_ROLES), None)
        case _:
            return None


def started_of(events: Iterable[EventUnion], turn_id: str) -> TurnStarted | None:
    """The last turn.started of this turn id among `events`."""
    found = None
    for event in events:
        if isinstance(event, TurnStarted) and event.turn_id == turn_id:
            found = event
    return found
