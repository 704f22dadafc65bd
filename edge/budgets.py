"""Spending budgets: a key's (its quota) and its tenant's (`[tenants.NAME]`).

Before a turn is sent, a caller with a budget has its spend since the period's start
(the 1st of this month, UTC, or ever) read from the usage ledger, in one round trip
for both budgets; over a token budget with this request's estimate, or at a USD budget,
it gets OpenAI's `insufficient_quota` 429. A turn already running finishes: it was
admitted. The ledger trails the log by a moment, so turns admitted together may
overshoot a budget by what they spend.

Fail closed: a usage service that does not answer within `SPEND_TIMEOUT` (or is still
catching up with the log) is a 503, never a free pass. Callers without budgets never
ask.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from bus.requests import BUS_DOWN, nats_request
from bus.subjects import USAGE_SPEND
from config import Config
from contracts.keys import Quota
from contracts.usage import SPEND_CODEC, SPEND_REPLY_CODEC, Spend, SpendQuery, SpendRequest
from edge.auth import Principal
from edge.openai_wire import ApiError, ChatRequest, TextPart
from edge.relay import bus_unavailable
from edge.usage import service_failure

__all__ = ["SPEND_TIMEOUT", "enforce_budgets", "estimate_tokens", "period_start"]

# Seconds the usage service has to answer before the request is refused.
SPEND_TIMEOUT = 2.0
# OpenAI's own words for a spent quota (HTTP 429, type and code `insufficient_quota`).
QUOTA_MESSAGE = "You exceeded your current quota, please check your plan and billing details."


def period_start(quota: Quota, now: datetime) -> date | None:
    """The first day a budget counts: the 1st of this month (UTC), or None for all time."""
    if quota.budget_period == "total":
        return None
    return now.astimezone(UTC).date().replace(day=1)


def estimate_tokens(chat: ChatRequest) -> int:
    """A rough size of the request: its text over four, plus the reply it allows."""
    chars = 0
    for message in chat.messages:
        if isinstance(message.content, str):
            chars += len(message.content)
        elif message.content is not None:
            chars += sum(len(p.text) for p in message.content if isinstance(p, TextPart))
    return chars // 4 + (chat.max_completion_tokens or chat.max_tokens or 0)


def _unavailable(why: str) -> ApiError:
    return ApiError(
        503, f"Budgets cannot be checked: {why}; try again shortly.", code="usage_unavailable"
    )


async def _spends(nc: Client, queries: list[SpendQuery]) -> list[Spend]:
    if not nc.is_connected:
        raise bus_unavailable()
    payload = SPEND_CODEC.encode(SpendRequest(queries=queries))
    try:
        msg = await nats_request(nc, USAGE_SPEND, payload, timeout=SPEND_TIMEOUT)
    except NoRespondersError:
        raise _unavailable("the usage service is not running") from None
    except NatsTimeout:
        raise _unavailable(
            f"the usage service did not answer within {SPEND_TIMEOUT:g} seconds"
        ) from None
    except BUS_DOWN:
        raise bus_unavailable() from None
    failure = service_failure(msg)
    if failure is not None:
        raise _unavailable(f"the usage service refused ({failure})")
    spends = SPEND_REPLY_CODEC.decode(msg.data).spends
    if len(spends) != len(queries):
        raise _unavailable("the usage service answered another question")
    return spends


def _refuse(whose: str, quota: Quota, what: str) -> ApiError:
    period = "this month" if quota.budget_period == "month" else "in total"
    return ApiError(
        429,
        f"{QUOTA_MESSAGE} (The {whose}'s {what} budget {period} is spent.)",
        type="insufficient_quota",
        code="insufficient_quota",
    )


async def enforce_budgets(
    nc: Client,
    config: Config,
    principal: Principal,
    chat: ChatRequest,
    now: datetime | None = None,
) -> None:
    """Refuse the request (429) when the key's or the tenant's budget is spent."""
    tenant = config.tenants.get(principal.tenant)
    budgets = [
        (whose, quota, key_id)
        for whose, quota, key_id in (
            ("key", principal.quota, principal.key_id),
            ("tenant", tenant.quota() if tenant is not None else Quota(), None),
        )
        if quota.limits_spend
    ]
    if not budgets:
        return
    moment = now or datetime.now(UTC)
    queries = [
        SpendQuery(tenant=principal.tenant, key_id=key_id, since=period_start(quota, moment))
        for _, quota, key_id in budgets
    ]
    spends = await _spends(nc, queries)
    estimate = estimate_tokens(chat)
    for (whose, quota, _), spent in zip(budgets, spends, strict=True):
        if quota.budget_tokens is not None and spent.tokens + estimate > quota.budget_tokens:
            raise _refuse(whose, quota, "token")
        if quota.budget_usd is not None and spent.cost_usd >= quota.budget_usd:
            raise _refuse(whose, quota, "USD")
