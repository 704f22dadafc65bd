"""Recognising a conversation that its client resends whole as the session that holds it.

Anthropic's clients resend the whole conversation every time and name no session. The
chat door continues a session only when its client names it (the session actor then
drops the resent part it already holds, actors/session.py); a client that names none
gets a new session. The Anthropic door does the same, and recognises the conversation
itself: after each turn the gateway records, in the key-value bucket VEIL_HISTORIES that
every gateway shares, a digest of the conversation as its client will resend it (its
messages and the reply, as the client got it) with the session that holds it and that
session's turn count then. A request whose messages up to its last assistant message
have a recorded digest continues that session, if the session still has that many
turns (so nothing was added to it elsewhere since): only the messages after that one
are sent, as from a client that names its session. Anything else (an edited or forked
conversation, a deleted session, one continued through another door) opens a new
session with the whole conversation. Two conversations that are word for word the same
may meet in one session; at that point its history is exactly what each client sent.

The digest covers the tenant, the user the key is pinned to, the end user the request
names, and each message's role, text, tool calls (their input as JSON with sorted keys)
and tool results; not the system prompt or the tools, which clients may change from one
request to the next. Entries hold digests, ids and counts, never text, and lapse after
`TTL` (the session itself stays: X-Session-Id still continues it). The bucket is a
convenience: when it cannot be read, the request opens a new session (logged).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import structlog
from aiohttp import web
from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from bus.codec import encode
from bus.connection import replicas as configured_replicas
from bus.subjects import HISTORIES_BUCKET, is_valid_id
from contracts.history import HISTORY_ENTRY_CODEC, HistoryEntry
from contracts.session import GetSession, SessionView, StartTurn, TurnDone
from edge.anthropic_wire import tool_input
from edge.chat import IDEMPOTENT_PREFIX, SESSION_HEADER
from edge.openai_wire import ApiError, ChatRequest, to_chat_messages
from edge.relay import ask_session
from edge.webkeys import CONFIG, NATS, PRINCIPAL
from eventstore.events import ChatMessage

__all__ = [
    "HISTORY",
    "TTL",
    "Conversation",
    "HistoryIndex",
    "add_history_index",
    "canonical",
    "conversation_digest",
    "recognise",
    "reply_message",
]

log = structlog.get_logger("veil.gateway")

# How long an entry lives after it was last written.
TTL = 30 * 24 * 3600.0
# Seconds one read or write of the bucket may take before it is given up.
KV_TIMEOUT = 2.0
# A session read to check that a recognised session is where the entry says.
SESSION_READ_TIMEOUT = 10.0


class HistoryIndex:
    """The bucket's entries: `h.<digest>` and `c.<command id>` (contracts/history.py)."""

    def __init__(self, kv: KeyValue, timeout: float = KV_TIMEOUT) -> None:
        self._kv = kv
        self._timeout = timeout

    @classmethod
    async def open(cls, js: JetStreamContext) -> HistoryIndex:
        try:
            kv = await js.key_value(HISTORIES_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(
                KeyValueConfig(
                    bucket=HISTORIES_BUCKET, history=1, ttl=TTL, replicas=configured_replicas()
                )
            )
        return cls(kv)

    async def get(self, key: str) -> HistoryEntry | None:
        try:
            async with asyncio.timeout(self._timeout):
                entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        except (TimeoutError, nats.errors.Error) as error:
            log.warning("history.unreadable", error=repr(error))
            return None
        if entry.value is None:
            return None
        try:
            return HISTORY_ENTRY_CODEC.decode(entry.value)
        except msgspec.DecodeError:
            return None

    async def put(self, key: str, entry: HistoryEntry) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._kv.put(key, HISTORY_ENTRY_CODEC.encode(entry))
        except (TimeoutError, nats.errors.Error) as error:
            log.warning("history.unwritten", error=repr(error))


HISTORY = web.AppKey("history", HistoryIndex)


def add_history_index(app: web.Application) -> None:
    """Open the bucket with the gateway (after its NATS connection)."""
    app.cleanup_ctx.append(_open)


async def _open(app: web.Application) -> AsyncIterator[None]:
    app[HISTORY] = await HistoryIndex.open(app[NATS].jetstream())
    yield


Canonical = tuple[str, str, str, list[tuple[str, str, str]]]


def canonical(message: ChatMessage) -> Canonical:
    """A message as its digest reads it: a tool call's arguments as the object the client
    got (keys sorted), so a resent call matches however the engine wrote its JSON."""
    calls = [
        (c.id, c.function.name, _encode_sorted(tool_input(c.function.arguments)))
        for c in message.tool_calls or ()
    ]
    return (message.role, message.content, message.tool_call_id or "", calls)


def _encode_sorted(value: Any) -> str:
    return msgspec.json.encode(value, order="sorted").decode()


def reply_message(done: TurnDone) -> ChatMessage:
    """The reply as the conversation's next request will carry it."""
    return ChatMessage(
        role="assistant", content=done.content, tool_calls=tuple(done.tool_calls) or None
    )


def conversation_digest(scope: Sequence[str], messages: Sequence[Canonical]) -> str:
    digest = hashlib.sha256(encode(list(scope)))
    for message in messages:
        digest.update(encode(message))  # each is one JSON array: the joins are unambiguous
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Conversation:
    """One request's conversation, and what it continues."""

    scope: tuple[str, str, str]
    messages: list[Canonical]  # the dialogue as the client sent it (no system prompt)
    # Whether the conversation the session holds will be known after the turn.
    known: bool
    session_id: str | None = None  # the session it was recognised as
    prefix: str = ""  # the digest it was recognised by
    turns: int = 0  # that session's turns then

    def _key(self, messages: Sequence[Canonical]) -> str:
        return f"h.{conversation_digest(self.scope, messages)}"

    async def answered(self, index: HistoryIndex, start: StartTurn, done: TurnDone) -> None:
        """The turn's reply: record the conversation as its client will resend it."""
        if not self.known:
            return
        entry = HistoryEntry(session_id=start.session_id, turns=self.turns + 1)
        await index.put(self._key([*self.messages, canonical(reply_message(done))]), entry)

    async def failed(self, index: HistoryIndex) -> None:
        """The turn failed: the session holds what it held, one turn more."""
        if self.session_id is not None:
            entry = HistoryEntry(session_id=self.session_id, turns=self.turns + 1)
            await index.put(f"h.{self.prefix}", entry)


async def _still_at(request: web.Request, entry: HistoryEntry) -> bool:
    """Whether the entry's session exists for this caller with the turns it recorded."""
    if not is_valid_id(entry.session_id):
        return False
    principal = request[PRINCIPAL]
    read = GetSession(session_id=entry.session_id, tenant=principal.tenant, user=principal.user)
    timeout = min(request.app[CONFIG].server.accept_timeout, SESSION_READ_TIMEOUT)
    try:
        view = await ask_session(request.app[NATS], read, timeout)
    except ApiError as error:
        if error.status == 404:
            return False  # deleted since
        raise
    return isinstance(view, SessionView) and view.turns == entry.turns


async def recognise(
    request: web.Request, chat: ChatRequest, command_id: str
) -> tuple[ChatRequest, Conversation]:
    """The request as the turn should run it: on the session that holds its conversation
    (only what is new sent), or as it is; and its Conversation, to record the outcome."""
    index = request.app[HISTORY]
    principal = request[PRINCIPAL]
    system = [m for m in chat.messages if m.role == "system"]
    dialogue = [m for m in chat.messages if m.role != "system"]
    scope = (principal.tenant, principal.user or "", chat.user or "")
    messages = [canonical(m) for m in to_chat_messages(_with_messages(chat, dialogue))]
    named = request.headers.get(SESSION_HEADER)
    # A session named by the client: what it holds is known only if recognised below.
    conversation = Conversation(scope=scope, messages=messages, known=not named)
    idempotent = command_id.startswith(IDEMPOTENT_PREFIX)
    entry = await index.get(f"c.{command_id}") if idempotent else None
    if entry is None:
        last = max((i for i, m in enumerate(dialogue) if m.role == "assistant"), default=-1)
        if last < 0:
            return chat, conversation
        prefix = conversation_digest(scope, messages[: last + 1])
        entry = await index.get(f"h.{prefix}")
        if entry is None or (named and named != entry.session_id):
            return chat, conversation
        if not await _still_at(request, entry):
            return chat, conversation
        entry = HistoryEntry(session_id=entry.session_id, turns=entry.turns, held=last + 1)
        if idempotent:
            # Its retry must be the same command on the same session, whatever happened since.
            await index.put(f"c.{command_id}", entry)
    held = entry.held
    recognised = replace(
        conversation,
        known=True,
        session_id=entry.session_id,
        prefix=conversation_digest(scope, messages[:held]),
        turns=entry.turns,
    )
    sent = _with_messages(chat, [*system, *dialogue[held:]], session_id=entry.session_id)
    return sent, recognised


def _with_messages(chat: ChatRequest, messages: list[Any], **changes: Any) -> ChatRequest:
    return msgspec.structs.replace(chat, messages=messages, **changes)
