"""What the sync and async sessions share: how a turn's request is built, how the session id
is learned from an answer, and where a session's resources live."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

__all__ = [
    "SESSION_HEADER",
    "TURNS_PAGE",
    "Content",
    "SessionNotStarted",
    "connection",
    "learned_id",
    "reply_text",
    "session_path",
    "turn_id_of",
    "turn_request",
]

SESSION_HEADER = "X-Session-Id"
# The most turns GET /turns answers per page.
TURNS_PAGE = 100

Content = str | Iterable[ChatCompletionMessageParam]
"""A user's text, or the new messages themselves (tool results, images, a system message)."""


class SessionNotStarted(LookupError):
    """The session has no id yet: no answer has named one, and none was given to resume."""


def connection(base_url: str | None, api_key: str | None) -> tuple[str, str]:
    """The gateway and key: as given, else VEIL_BASE_URL and VEIL_API_KEY, else a local
    gateway with authentication off (which takes any key).

    Never OPENAI_BASE_URL: on a Veil host that names Veil's upstream, not Veil."""
    url = base_url or os.environ.get("VEIL_BASE_URL") or "http://127.0.0.1:8000/v1"
    key = api_key or os.environ.get("VEIL_API_KEY") or "unused-when-auth-is-off"
    return url, key


def turn_request(
    model: str,
    session_id: str | None,
    user: str | None,
    content: Content,
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """The arguments of chat.completions.create for one turn: only the new messages, and the
    session's id once known (as the header, so the caller's body and metadata stay theirs)."""
    messages: list[ChatCompletionMessageParam] = (
        [{"role": "user", "content": content}] if isinstance(content, str) else list(content)
    )
    request: dict[str, Any] = {"model": model, "messages": messages, **params}
    if user is not None:
        request.setdefault("user", user)
    if session_id is not None:
        request["extra_headers"] = {
            SESSION_HEADER: session_id,
            **(params.get("extra_headers") or {}),
        }
    return request


def learned_id(header: str | None, body: object) -> str | None:
    """The session id an answer names: its X-Session-Id header, else the body's `session_id`
    (a proxy may drop headers it does not know)."""
    if header:
        return header
    extra = getattr(body, "model_extra", None) or {}
    found = extra.get("session_id")
    return found if isinstance(found, str) and found else None


def reply_text(completion: ChatCompletion) -> str:
    """The first choice's text; empty when the model only called tools."""
    return completion.choices[0].message.content or "" if completion.choices else ""


def turn_id_of(turn_or_completion_id: str) -> str:
    """A turn's id, given it or the id of the completion that answered it."""
    return turn_or_completion_id.removeprefix("chatcmpl-")


def session_path(session_id: str | None, *rest: str) -> str:
    """/sessions/{id}/..., each part quoted (a resumed id is the caller's text)."""
    if session_id is None:
        raise SessionNotStarted(
            "This session has no id yet: chat first, or resume one with session_id=..."
        )
    return "/".join(["/sessions", quote(session_id, safe=""), *(quote(r, safe="") for r in rest)])
