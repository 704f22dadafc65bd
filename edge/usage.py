"""GET /v1/usage: the usage ledger, in the shape of OpenAI's organization usage API.

`GET /v1/usage?from=YYYY-MM-DD&to=YYYY-MM-DD&group_by=model,day[&tenant=T][&key_id=K][&user=U]`
answers like `/v1/organization/usage/completions`: a page of time buckets, each with its
results (`input_tokens`, `output_tokens`, `num_model_requests`, and the dimensions
grouped by: `model`, `api_key_id`, `user_id`, `project_id` for the tenant, plus Veil's
`pipeline`, `engine`, `upstream_model` and `cost_usd`). With `day` among the groupings
there is one bucket per day of the range (empty days included, as OpenAI sends them);
without, one bucket spans the range. Days are UTC and both bounds are included.

Who sees what: a chat key its own key's usage; an audit key its tenant's; an admin key
any tenant's, or every tenant's when it names none.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Literal

import msgspec
from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.subjects import USAGE_QUERY, is_valid_id
from contracts.usage import (
    MAX_USAGE_ROWS,
    USAGE_GROUPS,
    USAGE_QUERY_CODEC,
    USAGE_REPORT_CODEC,
    UsageGroup,
    UsageQuery,
    UsageReport,
    UsageRow,
)
from edge.auth import Principal, require_scope
from edge.openai_wire import ApiError
from edge.openapi import Param, operation
from edge.relay import ask_bus
from edge.webkeys import NATS, PRINCIPAL, json_response

__all__ = [
    "UsageBucket",
    "UsagePage",
    "UsageResult",
    "ask_usage",
    "get_usage",
    "service_failure",
]

# Seconds a report may take.
USAGE_TIMEOUT = 10.0
# The longest range one request may ask for.
MAX_DAYS = 366
MAX_PARAM = 256
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


class UsageResult(msgspec.Struct, kw_only=True):
    """One group's usage; a dimension not grouped by is null."""

    object: Literal["organization.usage.completions.result"] = (
        "organization.usage.completions.result"
    )
    # Every model call's prompt and completion tokens.
    input_tokens: int
    output_tokens: int
    # Turns that ended: answered, failed or cancelled.
    num_model_requests: int
    cost_usd: float
    # The tenant.
    project_id: str | None = None
    api_key_id: str | None = None
    user_id: str | None = None
    model: str | None = None
    pipeline: str | None = None
    engine: str | None = None
    upstream_model: str | None = None


class UsageBucket(msgspec.Struct, kw_only=True):
    object: Literal["bucket"] = "bucket"
    # Unix seconds, start included, end excluded.
    start_time: int
    end_time: int
    results: list[UsageResult]


class UsagePage(msgspec.Struct, kw_only=True):
    object: Literal["page"] = "page"
    data: list[UsageBucket]
    # More groups matched than one answer carries.
    has_more: bool
    next_page: str | None = None


def service_failure(msg: Msg) -> str | None:
    """The micro service error a reply carries, if any."""
    if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
        return msg.headers.get("Nats-Service-Error") or "refused"
    return None


async def ask_usage(nc: Client, query: UsageQuery, timeout: float = USAGE_TIMEOUT) -> UsageReport:
    msg = await ask_bus(
        nc,
        USAGE_QUERY,
        USAGE_QUERY_CODEC.encode(query),
        timeout,
        absent="The usage service is not running; try again shortly.",
        late="The usage service did not answer in time.",
    )
    failure = service_failure(msg)
    if failure is not None:
        raise ApiError(503, f"The usage service failed: {failure}", code="service_unavailable")
    return USAGE_REPORT_CODEC.decode(msg.data)


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _day(request: web.Request, param: str, default: date) -> date:
    text = request.query.get(param)
    if text is None:
        return default
    if _DAY.fullmatch(text) is None:
        raise _invalid(param, f"'{param}' must be a day as YYYY-MM-DD.")
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise _invalid(param, f"'{param}' is not a calendar day: '{text}'.") from None


def _groups(request: web.Request) -> tuple[UsageGroup, ...]:
    text = ",".join(request.query.getall("group_by", []))
    if len(text) > MAX_PARAM:
        raise _invalid("group_by", "'group_by' is too long.")
    names = [part.strip() for part in text.split(",") if part.strip()]
    groups: list[UsageGroup] = []
    for name in names:
        group = next((g for g in USAGE_GROUPS if g == name), None)
        if group is None:
            raise _invalid(
                "group_by",
                f"Unknown grouping '{name[:64]}'; use any of {', '.join(USAGE_GROUPS)}.",
            )
        if group not in groups:
            groups.append(group)
    return tuple(groups)


def _text(request: web.Request, param: str) -> str | None:
    text = request.query.get(param)
    if text is not None and not 0 < len(text) <= MAX_PARAM:
        raise _invalid(param, f"'{param}' must be 1-{MAX_PARAM} characters.")
    return text


def _not_yours(param: str, message: str) -> ApiError:
    return ApiError(403, message, type="permission_error", param=param, code="forbidden")


def _scope(
    principal: Principal, tenant: str | None, key_id: str | None
) -> tuple[str | None, str | None]:
    """The tenant (None: all) and key the caller may see, given what it asks for."""
    if tenant is not None and not is_valid_id(tenant):
        raise _invalid("tenant", "'tenant' must be 1-128 characters from A-Za-z0-9_-.")
    if principal.admin:
        return tenant, key_id
    if tenant is not None and tenant != principal.tenant:
        raise _not_yours("tenant", "This API key may see its own tenant's usage only.")
    if "audit" in principal.scopes:
        return principal.tenant, key_id
    if key_id is not None and key_id != principal.key_id:
        raise _not_yours("key_id", "This API key may see its own usage only.")
    return principal.tenant, principal.key_id


_DAY_PARAM = Annotated[str, msgspec.Meta(pattern=r"^\d{4}-\d{2}-\d{2}$", examples=["2026-05-01"])]


@operation(
    "Usage and cost",
    description="Tokens, requests and cost from the usage ledger, in the shape of OpenAI's "
    "organization usage API: one bucket per day when grouped by `day`, else one for the "
    "range. A chat key sees its own key's usage, an audit key its tenant's, an admin key "
    "any tenant's, or every tenant's when it names none.",
    tags=("usage",),
    query=(
        Param("from", _DAY_PARAM, "First day (UTC), included; default the 1st of this month."),
        Param("to", _DAY_PARAM, "Last day (UTC), included; default today."),
        Param(
            "group_by",
            Annotated[str, msgspec.Meta(max_length=MAX_PARAM)],
            f"Comma-separated: {', '.join(USAGE_GROUPS)}.",
        ),
        Param("tenant", Annotated[str, msgspec.Meta(max_length=MAX_PARAM)], "One tenant."),
        Param("key_id", Annotated[str, msgspec.Meta(max_length=MAX_PARAM)], "One key."),
        Param("user", Annotated[str, msgspec.Meta(max_length=MAX_PARAM)], "One end user."),
    ),
    ok=UsagePage,
    errors=(400, 403, 503, 504),
)
async def get_usage(request: web.Request) -> web.Response:
    principal: Principal = request[PRINCIPAL]
    require_scope(principal, "chat", "audit", "admin")
    today = datetime.now(UTC).date()
    since = _day(request, "from", today.replace(day=1))
    until = _day(request, "to", today)
    if since > until:
        raise _invalid("from", "'from' must not be after 'to'.")
    if (until - since).days >= MAX_DAYS:
        raise _invalid("from", f"Ask for at most {MAX_DAYS} days at once.")
    groups = _groups(request)
    tenant, key_id = _scope(principal, _text(request, "tenant"), _text(request, "key_id"))
    query = UsageQuery(
        tenant=tenant,
        key_id=key_id,
        user=_text(request, "user"),
        since=since,
        until=until,
        group_by=groups,
        limit=MAX_USAGE_ROWS,
    )
    report = await ask_usage(request.app[NATS], query)
    return json_response(_page(report, since, until, by_day="day" in groups))


def _epoch(day: date) -> int:
    return int(datetime.combine(day, time(), UTC).timestamp())


def _result(row: UsageRow) -> UsageResult:
    return UsageResult(
        input_tokens=row.prompt_tokens,
        output_tokens=row.completion_tokens,
        num_model_requests=row.requests,
        cost_usd=row.cost_usd,
        project_id=row.tenant,
        api_key_id=row.key_id,
        user_id=row.user,
        model=row.model,
        pipeline=row.pipeline,
        engine=row.engine,
        upstream_model=row.upstream_model,
    )


def _bucket(start: date, end: date, rows: list[UsageRow]) -> UsageBucket:
    return UsageBucket(
        start_time=_epoch(start), end_time=_epoch(end), results=[_result(r) for r in rows]
    )


def _page(report: UsageReport, since: date, until: date, *, by_day: bool) -> UsagePage:
    if by_day:
        of_day: dict[date | None, list[UsageRow]] = {}
        for row in report.rows:
            of_day.setdefault(row.day, []).append(row)
        days = [since + timedelta(days=n) for n in range((until - since).days + 1)]
        buckets = [_bucket(day, day + timedelta(days=1), of_day.get(day, [])) for day in days]
    else:
        buckets = [_bucket(since, until + timedelta(days=1), report.rows)]
    return UsagePage(data=buckets, has_more=report.truncated)
