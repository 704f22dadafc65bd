"""The gateway's Prometheus metrics, and its /metrics page (admin keys only).

HTTP requests by route, method, status and public model; their latency and, for
streams, the time to the first token; tokens by public model; requests refused by a
limit (`limit_hit`, for the limiter to call); the event loop's asyncio tasks, counted
when scraped (`veil_asyncio_tasks`: a leak shows as a count that never comes back down). Labels are bounded: the route is the
route's pattern (never the path), the model a configured public model (never what the
client sent), the method one of HTTP's own.

The metrics live in the registry the process role made (veil/telemetry.py), shared with
its workers in `veil serve`; `veil gateway --metrics-port` and `[server] metrics_port`
also serve them without a key on a listener of their own.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Iterator
from typing import TypeVar

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from edge.auth import require_scope
from edge.cross_site import refuse_cross_site
from edge.openapi import operation
from edge.webkeys import AUTH
from eventstore.events import Usage

__all__ = ["METRICS", "GatewayMetrics", "limit_hit", "metrics_page"]

M = TypeVar("M", bound=MetricWrapperBase)

# Seconds: from a cached refusal (sub-millisecond) to a long generation (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# A limit's name as the limiter gives it ("rpm", "tpm", "concurrency", "budget"...).
_LIMIT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
TASKS = "veil_asyncio_tasks"
_TASKS_HELP = "asyncio tasks of the process's event loop (not yet done), counted when scraped"


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _TaskCount(Collector):
    """`veil_asyncio_tasks`: len(asyncio.all_tasks()) of the loop scraped on (or, scraped
    from another thread, of the loop running where the metrics were made). actors/metrics.py
    has the same gauge for workers (edge may not import actors): in `veil serve`, one
    process, one registry, whichever registers first counts for both."""

    def __init__(self) -> None:
        self._loop = _running_loop()

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(TASKS, _TASKS_HELP)]  # so a second one is refused

    def collect(self) -> Iterator[Metric]:
        loop = _running_loop() or self._loop
        if loop is not None and not loop.is_closed():
            yield GaugeMetricFamily(TASKS, _TASKS_HELP, value=len(asyncio.all_tasks(loop)))


class GatewayMetrics:
    """The gateway's metrics, in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._requests = Counter(
            "veil_http_requests",
            "HTTP requests by route, method, status and public model",
            ["route", "method", "status", "model"],
            registry=registry,
        )
        self._duration = Histogram(
            "veil_http_request_duration_seconds",
            "Time to answer a request (a stream: to its last event), by route and public model",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._ttft = Histogram(
            "veil_time_to_first_token_seconds",
            "Streaming chat requests: from the request's arrival to its first output",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._tokens = Counter(
            "veil_tokens",
            "Tokens of answered chat requests by public model and kind (prompt, completion)",
            ["model", "kind"],
            registry=registry,
        )
        self._limited = Counter(
            "veil_rate_limited",
            "Requests refused by a limit (rate, tokens, concurrency, budget), by limit",
            ["limit"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "veil_http_requests_in_flight", "Requests being served now", registry=registry
        )
        self._children: dict[tuple[object, ...], MetricWrapperBase] = {}
        try:
            registry.register(_TaskCount())
        except ValueError:  # the workers' metrics in the same registry count them already
            pass

    def _child(self, metric: M, *labels: str) -> M:
        # prometheus_client's labels() locks and checks its arguments on every call.
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child  # type: ignore[return-value]  # the same metric's child

    def request(self, route: str, method: str, status: int, model: str, seconds: float) -> None:
        method = method if method in METHODS else "other"
        self._child(self._requests, route, method, str(status), model).inc()
        self._child(self._duration, route, model).observe(seconds)

    def first_token(self, model: str, seconds: float) -> None:
        self._child(self._ttft, model).observe(seconds)

    def tokens(self, model: str, usage: Usage) -> None:
        if usage.prompt_tokens:
            self._child(self._tokens, model, "prompt").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self._child(self._tokens, model, "completion").inc(usage.completion_tokens)

    def limit_hit(self, limit: str) -> None:
        self._child(self._limited, limit if _LIMIT_NAME.fullmatch(limit) else "other").inc()


METRICS = web.AppKey("metrics", GatewayMetrics)


def limit_hit(request: web.Request, limit: str) -> None:
    """Count a request that a limit refused: `veil_rate_limited_total{limit=...}`.

    For the limiter and budgets to call where they refuse (before the 429). `limit` is a
    constant naming the limit ("rpm", "tpm", "concurrency", "budget"): lowercase letters,
    digits and '_', at most 32; anything else is counted as "other".
    """
    request.app[METRICS].limit_hit(limit)


@operation(
    "Prometheus metrics",
    description="The gateway's (and, in `veil serve`, its workers') metrics in Prometheus' "
    "text format. Admin keys (or anyone on loopback while the server has no keys).",
    tags=("meta",),
    ok_media={"text/plain": "Prometheus' text exposition format."},
)
async def metrics_page(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus' text format, for admin keys (or anyone on loopback while
    no keys exist: they may read what an admin reads)."""
    auth = request.app[AUTH]
    if not auth.enabled:
        refuse_cross_site(request)
    principal = await auth.resolve(request.headers.get("Authorization"))
    if not principal.anonymous:
        require_scope(principal, "admin")
    return web.Response(
        body=generate_latest(request.app[METRICS].registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )
