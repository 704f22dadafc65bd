"""A small client library for Veil: the official `openai` SDK, keeping the session id.

    from veil.client import VeilClient

    with VeilClient(base_url="http://127.0.0.1:8000/v1", api_key="...") as veil:
        chat = veil.session(model="veil")
        chat.chat("I'm Ann.")              # the answer names the session: chat.id
        chat.chat("Who am I?")             # sends only this message, under that id
        for piece in chat.stream("Tell me more."):
            print(piece, end="")
        print(chat.messages(), chat.turns(), chat.memories("Ann"))
        chat.delete()

`AsyncVeilClient` is the same with `await` (and `async for` over `stream`). Errors are the
SDK's own (openai.NotFoundError, openai.AuthenticationError...), and auth, retries and
base_url are the SDK client's, shared by the chat and the sessions API. Everything else:
`.openai`, the SDK client itself.

Only the standard library and `openai` are imported (the `client` extra), never the server.
"""

from __future__ import annotations

try:
    import openai as _openai  # noqa: F401  (here for the message below)
except ModuleNotFoundError as missing:  # pragma: no cover - depends on what is installed
    raise ModuleNotFoundError(
        "veil.client needs the openai package: pip install 'veil[client]' (or openai)",
        name=missing.name,
    ) from missing

from veil.client._async import AsyncSession, AsyncVeilClient
from veil.client._models import Memory, Message, SessionDeleted, SessionInfo, Turn
from veil.client._shared import SESSION_HEADER, Content, SessionNotStarted
from veil.client._sync import Session, VeilClient

__all__ = [
    "SESSION_HEADER",
    "AsyncSession",
    "AsyncVeilClient",
    "Content",
    "Memory",
    "Message",
    "Session",
    "SessionDeleted",
    "SessionInfo",
    "SessionNotStarted",
    "Turn",
    "VeilClient",
]
