"""The usage ledger's requests: usage grouped for reports (`usage.query`) and spend
totals for budgets (`usage.spend`).

The ledger's grain is a UTC day: every bound here is a day, inclusive.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

import msgspec

from bus.codec import Codec

__all__ = [
    "MAX_SPEND_QUERIES",
    "MAX_USAGE_ROWS",
    "SPEND_CODEC",
    "SPEND_REPLY_CODEC",
    "USAGE_GROUPS",
    "USAGE_QUERY_CODEC",
    "USAGE_REPORT_CODEC",
    "Spend",
    "SpendQuery",
    "SpendReply",
    "SpendRequest",
    "UsageGroup",
    "UsageQuery",
    "UsageReport",
    "UsageRow",
]

UsageGroup = Literal[
    "model", "key", "day", "user", "pipeline", "engine", "upstream_model", "tenant"
]
USAGE_GROUPS: tuple[UsageGroup, ...] = (
    "model",
    "key",
    "day",
    "user",
    "pipeline",
    "engine",
    "upstream_model",
    "tenant",
)
# Rows a report carries at most; past it, `truncated`.
MAX_USAGE_ROWS = 10_000
MAX_SPEND_QUERIES = 8

_Name = Annotated[str, msgspec.Meta(max_length=256)]


class UsageQuery(msgspec.Struct, frozen=True, kw_only=True):
    """Usage summed over the rows that match, one result per group."""

    # None: every tenant (only an admin's request may say so; the gateway decides).
    tenant: _Name | None = None
    key_id: _Name | None = None
    user: _Name | None = None
    since: date | None = None
    until: date | None = None
    group_by: Annotated[tuple[UsageGroup, ...], msgspec.Meta(max_length=len(USAGE_GROUPS))] = ()
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_USAGE_ROWS)] = MAX_USAGE_ROWS


class UsageRow(msgspec.Struct, frozen=True, kw_only=True):
    """One group's sums; a dimension it is not grouped by is None (as is a turn's user
    when the client named none)."""

    day: date | None = None
    tenant: str | None = None
    key_id: str | None = None
    user: str | None = None
    model: str | None = None
    pipeline: str | None = None
    engine: str | None = None
    upstream_model: str | None = None
    # Turns that ended (answered, failed or cancelled).
    requests: int = 0
    # Every model call's tokens: failed attempts, tool steps, summaries, fact extraction.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


class UsageReport(msgspec.Struct, frozen=True, kw_only=True):
    rows: list[UsageRow]
    # More groups matched than `limit`.
    truncated: bool = False
    # The last CHAT_EVENTS sequence the ledger has applied.
    applied_seq: int = 0


class SpendQuery(msgspec.Struct, frozen=True, kw_only=True):
    """What a key (or, without `key_id`, a whole tenant) spent since a day (None: ever)."""

    tenant: _Name
    key_id: _Name | None = None
    since: date | None = None


class Spend(msgspec.Struct, frozen=True, kw_only=True):
    tokens: int = 0
    cost_usd: float = 0.0


class SpendRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Several totals in one round trip (a key's budget and its tenant's)."""

    queries: Annotated[list[SpendQuery], msgspec.Meta(min_length=1, max_length=MAX_SPEND_QUERIES)]


class SpendReply(msgspec.Struct, frozen=True, kw_only=True):
    # In the order of the queries.
    spends: list[Spend]


USAGE_QUERY_CODEC: Codec[UsageQuery] = Codec(UsageQuery)
USAGE_REPORT_CODEC: Codec[UsageReport] = Codec(UsageReport)
SPEND_CODEC: Codec[SpendRequest] = Codec(SpendRequest)
SPEND_REPLY_CODEC: Codec[SpendReply] = Codec(SpendReply)
