"""A chat request's admission against the rate limits of its key and its tenant.

`admitted()` wraps the turn: it charges the key's scope, then the tenant's (taking
the key's charge back when the tenant refuses), answers 429 in OpenAI's shape with
Retry-After when a limit refuses, and 503 when the limit store cannot answer (unless
`[limits] fail_open`). When the turn ends, however it ends, the request's concurrency
slot is freed and its token estimate replaced by what it used. Callers without limits
pass through without a round trip to the store.

The x-ratelimit-* headers go on every answer of an admitted or refused request (the
stream's too, before its first event): the `on_response_prepare` hook adds what
admission left on the request.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NamedTuple

import structlog
from aiohttp import web

from config import Config
from contracts.keys import Quota
from contracts.session import Delta, ToolDelta, TurnDone, TurnError
from edge.auth import Principal
from edge.limit_window import (
    CHARS_PER_TOKEN,
    WINDOW,
    Ask,
    Refusal,
    Verdict,
    duration_text,
    estimate_tokens,
)
from edge.limits import LimitStore, LimitsUnavailable, key_scope, tenant_scope
from edge.metrics import limit_hit
from edge.openai_wire import ApiError, ChatRequest, RefusalPart, TextPart
from edge.webkeys import CONFIG, NATS, PRINCIPAL

__all__ = ["LIMITS", "Admission", "add_limits", "admitted", "prompt_chars"]

log = structlog.get_logger("veil.limits")

LIMITS = web.AppKey("limits", LimitStore)
# The x-ratelimit-* (and Retry-After) headers of this request's answer.
RATE_HEADERS = web.RequestKey("rate_headers", dict[str, str])
# How veil_rate_limited_total names each kind of refusal.
_METRIC_NAMES = {"requests": "rpm", "tokens": "tpm", "concurrency": "concurrency"}
# Seconds a concurrency lease outlives the longest a turn may wait and run.
LEASE_MARGIN = 30.0

Item = Delta | ToolDelta | TurnDone | TurnError
# Settlements still running after their request was cancelled: kept from the collector.
_settling: set[asyncio.Task[None]] = set()


class _Charged(NamedTuple):
    scope: str
    second: int
    requests: int  # 1 where requests are counted
    tokens: int
    counts_tokens: bool
    leased: bool


class _Scope(NamedTuple):
    key: str
    name: str  # as a refusal names it
    quota: Quota


def add_limits(app: web.Application) -> None:
    """Open the limit store with the gateway (after its NATS connection) and add the
    headers admission leaves to every answer."""
    app.cleanup_ctx.append(_open_store)
    app.on_response_prepare.append(_add_headers)


async def _open_store(app: web.Application) -> AsyncIterator[None]:
    app[LIMITS] = await LimitStore.open(app[NATS].jetstream(), app[CONFIG].limits.timeout)
    yield


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = request.get(RATE_HEADERS)
    if headers:
        response.headers.update(headers)


def prompt_chars(chat: ChatRequest) -> int:
    """Characters of the request's messages: their text and their tool calls."""
    total = 0
    for message in chat.messages:
        content = message.content
        if isinstance(content, str):
            total += len(content)
        elif content:
            for part in content:
                if isinstance(part, TextPart):
                    total += len(part.text)
                elif isinstance(part, RefusalPart):
                    total += len(part.refusal)
        for call in message.tool_calls or ():
            total += len(call.function.name) + len(call.function.arguments)
    return total


def _scopes(config: Config, principal: Principal) -> list[_Scope]:
    """The key's scope and the tenant's, those with a rate limit, in that order."""
    found = []
    if principal.quota.limits_rate:
        found.append(
            _Scope(key_scope(principal.key_id), f"API key {principal.key_id}", principal.quota)
        )
    tenant = config.tenants.get(principal.tenant)
    if tenant is not None and (quota := tenant.quota()).limits_rate:
        found.append(_Scope(tenant_scope(principal.tenant), f"tenant {principal.tenant}", quota))
    return found


class Admission:
    """One admitted request: what it was charged, and what it turned out to use."""

    def __init__(
        self,
        store: LimitStore | None = None,
        ticket: str = "",
        prompt: int = 0,
        charged: tuple[_Charged, ...] = (),
    ) -> None:
        self._store = store
        self._ticket = ticket
        self._prompt = prompt  # the prompt's estimated tokens
        self._charged = charged
        self._streamed = 0  # characters streamed to the client
        self._final: TurnDone | TurnError | None = None
        self._settled = False

    def finished(self, item: TurnDone | TurnError) -> None:
        """The turn's result (a non-streamed turn)."""
        if self._charged:
            self._final = item

    def watch(self, batches: AsyncIterator[list[Item]]) -> AsyncIterator[list[Item]]:
        """A stream's batches, counted as they pass; it settles on the final item, before
        the client reads the end of the stream (and may send its next request)."""
        return self._watch(batches) if self._charged else batches

    async def _watch(self, batches: AsyncIterator[list[Item]]) -> AsyncIterator[list[Item]]:
        async for batch in batches:
            for item in batch:
                if isinstance(item, Delta):
                    self._streamed += len(item.text)
                elif isinstance(item, ToolDelta):
                    self._streamed += len(item.name or "") + len(item.arguments)
                else:
                    self._final = item
                    await self.settle(None)
            yield batch

    def _used(self, error: BaseException | None) -> int | None:
        """Tokens the request used; None: unknown, so the estimate stands."""
        final = self._final
        if isinstance(final, TurnDone):
            usage = final.usage
            return usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
        if isinstance(final, TurnError):
            # A failed turn counts nothing, unless it had already streamed text.
            return self._prompt + self._tokens(len(final.content)) if final.content else 0
        if error is None:
            # The client left: the prompt went upstream, and what was streamed came back.
            return self._prompt + self._tokens(self._streamed)
        if isinstance(error, ApiError) and error.status < 500:
            return 0  # refused before it ran
        return None

    @staticmethod
    def _tokens(chars: int) -> int:
        return math.ceil(chars / CHARS_PER_TOKEN)

    async def settle(self, error: BaseException | None) -> None:
        """Free the request's slot and true up its tokens, once; never raises. A cancelled
        request's settlement goes on in the background."""
        if self._settled or not self._charged:
            return
        self._settled = True
        task = asyncio.ensure_future(self._settle(self._used(error)))
        _settling.add(task)
        task.add_done_callback(_settling.discard)
        await asyncio.shield(task)

    async def _settle(self, used: int | None) -> None:
        store = self._store
        assert store is not None
        changes = []
        for c in self._charged:
            delta = used - c.tokens if used is not None and c.counts_tokens else 0
            if delta or c.leased:
                changes.append(store.settle(c.scope, self._ticket, c.second, delta))
        for result in await asyncio.gather(*changes, return_exceptions=True):
            if isinstance(result, BaseException):
                log.warning("limits.settle_failed", error=repr(result))


# Callers without rate limits: nothing to charge or settle.
NO_LIMITS = Admission()


@asynccontextmanager
async def admitted(request: web.Request, chat: ChatRequest) -> AsyncIterator[Admission]:
    """Admit the request (429/503 otherwise) and settle it when the block ends."""
    admission = await _admit(request, chat)
    try:
        yield admission
    except BaseException as error:
        await admission.settle(error)
        raise
    await admission.settle(None)


async def _admit(request: web.Request, chat: ChatRequest) -> Admission:
    config = request.app[CONFIG]
    scopes = _scopes(config, request[PRINCIPAL])
    if not scopes:
        return NO_LIMITS
    store = request.app[LIMITS]
    chars = prompt_chars(chat)
    reply = (chat.max_completion_tokens or chat.max_tokens or 0) * (chat.n or 1)
    server = config.server
    ask = Ask(
        ticket=secrets.token_hex(8),
        tokens=estimate_tokens(chars, reply),
        lease_until=store.clock() + server.accept_timeout + server.turn_timeout + LEASE_MARGIN,
    )
    verdicts: list[tuple[_Scope, Verdict]] = []
    charged: list[_Charged] = []
    try:
        for scope in scopes:
            verdict = await store.charge(scope.key, scope.quota, ask)
            verdicts.append((scope, verdict))
            if not verdict.admitted:
                break
            charged.append(_charged(scope, verdict, ask))
    except LimitsUnavailable as error:
        log.warning("limits.unavailable", error=str(error), fail_open=config.limits.fail_open)
        if not config.limits.fail_open:
            await _undo(store, ask.ticket, charged)
            raise ApiError(
                503,
                "The rate limit store is unavailable; try again shortly.",
                code="limits_unavailable",
            ) from None
    headers = _headers([v for _, v in verdicts])
    request[RATE_HEADERS] = headers
    if verdicts and verdicts[-1][1].refusal is not None:
        await _undo(store, ask.ticket, charged)
        scope, verdict = verdicts[-1]
        assert verdict.refusal is not None
        limit_hit(request, _METRIC_NAMES.get(verdict.refusal.dimension, "other"))
        raise _too_many(scope.name, verdict.refusal, headers)
    prompt = estimate_tokens(chars, None)
    return Admission(store, ask.ticket, prompt, tuple(charged))


def _charged(scope: _Scope, verdict: Verdict, ask: Ask) -> _Charged:
    return _Charged(
        scope=scope.key,
        second=verdict.second,
        requests=1 if scope.quota.rpm is not None else 0,
        tokens=ask.tokens if scope.quota.tpm is not None else 0,
        counts_tokens=scope.quota.tpm is not None,
        leased=scope.quota.concurrency is not None,
    )


async def _undo(store: LimitStore, ticket: str, charged: list[_Charged]) -> None:
    """Take back the charges of a request another scope refused; never raises."""
    changes = [store.undo(c.scope, ticket, c.second, c.requests, c.tokens) for c in charged]
    for result in await asyncio.gather(*changes, return_exceptions=True):
        if isinstance(result, BaseException):
            log.warning("limits.undo_failed", error=repr(result))


def _headers(verdicts: list[Verdict]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the tightest of the scopes, limit by limit."""
    headers = {}
    for dimension in ("requests", "tokens"):
        figures = [f for v in verdicts if (f := getattr(v, dimension)) is not None]
        if not figures:
            continue
        tightest = min(figures, key=lambda f: (f.remaining, f.limit))
        headers[f"x-ratelimit-limit-{dimension}"] = str(tightest.limit)
        headers[f"x-ratelimit-remaining-{dimension}"] = str(tightest.remaining)
        headers[f"x-ratelimit-reset-{dimension}"] = duration_text(tightest.reset)
    return headers


def _too_many(name: str, refusal: Refusal, headers: dict[str, str]) -> ApiError:
    """OpenAI's 429 for a rate limit; Retry-After (whole seconds) goes into `headers`."""
    wait = refusal.retry_after
    headers["Retry-After"] = str(max(1, math.ceil(WINDOW if wait is None else wait)))
    if refusal.dimension == "concurrency":
        message = (
            f"Too many concurrent requests for {name}: Limit {refusal.limit}, "
            f"Running {refusal.used}. Please try again when one has finished."
        )
        return ApiError(429, message, type="requests", code="rate_limit_exceeded")
    per = "requests per min (RPM)" if refusal.dimension == "requests" else "tokens per min (TPM)"
    if wait is None:
        # It can never fit: the SDKs should not retry it.
        headers["x-should-retry"] = "false"
        message = (
            f"Request too large for {name} on {per}: Limit {refusal.limit}, Requested "
            f"{refusal.requested}. The input or output tokens must be reduced in order to "
            "run successfully."
        )
    else:
        message = (
            f"Rate limit reached for {name} on {per}: Limit {refusal.limit}, Used "
            f"{refusal.used}, Requested {refusal.requested}. Please try again in "
            f"{duration_text(wait)}."
        )
    return ApiError(429, message, type=refusal.dimension, code="rate_limit_exceeded")
