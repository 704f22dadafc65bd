"""The error a reply carries: OpenAI's terms, and the one status-to-type mapping."""

from __future__ import annotations

import msgspec

__all__ = ["ErrorInfo", "error_info", "error_type"]


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An error in OpenAI's terms: HTTP status, type, code and a readable message."""

    status: int
    type: str
    code: str
    message: str
    param: str | None = None
    # Worth another try (rate limit, server error, unreachable, timeout), and when.
    retryable: bool = False
    retry_after: float | None = None
    # What only operators see (the log, the session's events): an upstream's URL, its
    # own words, an exception. Clients get `message`, which never carries these.
    detail: str | None = None


def error_type(status: int) -> str:
    """OpenAI's error type for an HTTP status: the client's mistake, or ours."""
    return "invalid_request_error" if status < 500 else "api_error"


def error_info(status: int, code: str, message: str, param: str | None = None) -> ErrorInfo:
    return ErrorInfo(
        status=status, type=error_type(status), code=code, message=message, param=param
    )
