"""Errors on the Anthropic door, in Anthropic's shape and with the status the gateway chose.

Every error of the gateway is decided once, as an ApiError with an HTTP status (the
same refusals as on the chat door: auth, scopes, limits, budgets, a bad body, an unknown
model, a busy or absent part of Veil); under `/v1/messages` it is written as
`{"type": "error", "error": {"type": ..., "message": ...}}`, the type read from the
status as Anthropic does, so its SDKs raise their own exception classes. A 503 (a part
of Veil or an upstream is unavailable) says `overloaded_error`: try again shortly.
"""

from __future__ import annotations

from edge.anthropic_responses import AnthropicError, AnthropicErrorBody, ErrorType

__all__ = ["MESSAGES_PATH", "anthropic_error", "error_type", "speaks_anthropic"]

MESSAGES_PATH = "/v1/messages"

_TYPES: dict[int, ErrorType] = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def speaks_anthropic(path: str) -> bool:
    """Whether a request's path is the Anthropic door's (its errors take that shape)."""
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")


def error_type(status: int) -> ErrorType:
    found = _TYPES.get(status)
    if found is not None:
        return found
    return "invalid_request_error" if status < 500 else "api_error"


def anthropic_error(status: int, message: str) -> AnthropicErrorBody:
    return AnthropicErrorBody(
        type="error", error=AnthropicError(type=error_type(status), message=message)
    )
