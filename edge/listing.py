"""The paging parameters of OpenAI's item lists (`order`, `limit`), read one way for every door."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from edge.openai_wire import ApiError

__all__ = ["MAX_ITEMS_PAGE", "list_limit", "list_order"]

# The most items one page lists, as OpenAI's item lists allow.
MAX_ITEMS_PAGE = 100


def list_order(query: Mapping[str, str]) -> Literal["asc", "desc"]:
    """`order`: newest first unless the caller asks for `asc`."""
    match query.get("order", "desc"):
        case "asc":
            return "asc"
        case "desc":
            return "desc"
    raise ApiError(400, "order must be 'asc' or 'desc'.", param="order", code="invalid_value")


def list_limit(query: Mapping[str, str], default: int = 20) -> int:
    """`limit`: 1 to MAX_ITEMS_PAGE."""
    try:
        limit = int(query.get("limit", str(default)))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_ITEMS_PAGE:
        raise ApiError(
            400, f"limit must be 1-{MAX_ITEMS_PAGE}.", param="limit", code="invalid_value"
        )
    return limit
