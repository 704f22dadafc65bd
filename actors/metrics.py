"""The workers' Prometheus metrics: model calls, tokens, upstream errors, fallbacks, and
what is read only when scraped (mailbox depths, memory indexing lag, the event loop's
asyncio tasks).

One `WorkerMetrics` per registry: a process makes one registry (veil/telemetry.py) and
its gateway and workers share it, so `veil serve` shows everything on one page, while
tests that start several instances in one process give each its own. Counters are
bumped where the thing happens, through label children cached here (prometheus_client's
`labels()` takes a lock and checks its arguments on every call); gauges that describe a
state (queues, lag) are computed by a collector at scrape time, so the turns pay nothing
for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from contracts.model import GenerateResult

__all__ = ["LATENCY_BUCKETS", "WorkerMetrics"]

# Seconds: model calls and turns take from milliseconds (a cache, a fake) to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

M = TypeVar("M", bound=MetricWrapperBase)

TASKS = "veil_asyncio_tasks"
_TASKS_HELP = "asyncio tasks of the process's event loop (not yet done), counted when scraped"

# What a scrape reads: (service, active actors, (queued in all mailboxes, in the fullest)).
HostProbe = Callable[[], tuple[int, tuple[int, int]]]


class _StateCollector(Collector):
    """Gauges read at scrape time from the running actors."""

    def __init__(self) -> None:
        self.hosts: dict[str, HostProbe] = {}
        self.running: dict[str, Callable[[], int]] = {}
        self.memory: Callable[[], dict[str, object]] | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # names are checked by the metrics' own registration, not here

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "veil_actors_active", "Actors live in memory, by service", labels=["service"]
        )
        queued = GaugeMetricFamily(
            "veil_actor_mailbox_depth",
            "Requests waiting in the actors' mailboxes, by service (all together)",
            labels=["service"],
        )
        deepest = GaugeMetricFamily(
            "veil_actor_mailbox_max_depth",
            "Requests waiting in the fullest mailbox of a service",
            labels=["service"],
        )
        for service, probe in self.hosts.items():
            count, (total, fullest) = probe()
            active.add_metric([service], count)
            queued.add_metric([service], total)
            deepest.add_metric([service], fullest)
        yield from (active, queued, deepest)
        running = GaugeMetricFamily(
            "veil_service_requests_running",
            "Requests a service is serving now (generations, tool calls)",
            labels=["service"],
        )
        for service, serving in self.running.items():
            running.add_metric([service], serving())
        yield running
        if self.memory is not None:
            stats = self.memory()
            lag = stats.get("lag_seconds", 0.0)
            applied = stats.get("applied_seq", 0)
            yield GaugeMetricFamily(
                "veil_memory_index_lag_seconds",
                "Age of the oldest event in the log that the memory index has not applied yet",
                value=float(lag) if isinstance(lag, int | float) else 0.0,
            )
            yield GaugeMetricFamily(
                "veil_memory_index_applied_seq",
                "The last CHAT_EVENTS sequence the memory index has applied",
                value=float(applied) if isinstance(applied, int | float) else 0.0,
            )


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _TaskCount(Collector):
    """`veil_asyncio_tasks`: len(asyncio.all_tasks()) of the loop scraped on (or, scraped
    from another thread, of the loop running where the metrics were made). edge/metrics.py
    has the same gauge for the gateway (actors may not import edge): in `veil serve`, one
    process, one registry, whichever registers first counts for both."""

    def __init__(self) -> None:
        self._loop = _running_loop()

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(TASKS, _TASKS_HELP)]  # so a second one is refused

    def collect(self) -> Iterator[Metric]:
        loop = _running_loop() or self._loop
        if loop is not None and not loop.is_closed():
            yield GaugeMetricFamily(TASKS, _TASKS_HELP, value=len(asyncio.all_tasks(loop)))


class WorkerMetrics:
    """The metrics of one process's actors, in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._calls = Counter(
            "veil_model_calls",
            "Model calls by engine, upstream model and outcome (ok, error, cancelled)",
            ["engine", "model", "outcome"],
            registry=registry,
        )
        self._errors = Counter(
            "veil_model_upstream_errors",
            "Failed model calls by engine, HTTP status and error code",
            ["engine", "status", "code"],
            registry=registry,
        )
        self._tokens = Counter(
            "veil_model_tokens",
            "Tokens by engine, upstream model and kind (prompt, completion)",
            ["engine", "model", "kind"],
            registry=registry,
        )
        self._latency = Histogram(
            "veil_model_call_seconds",
            "Model call latency by engine",
            ["engine"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._ttft = Histogram(
            "veil_model_time_to_first_token_seconds",
            "Time from a streamed model call's start to its first token, by engine",
            ["engine"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._fallbacks = Counter(
            "veil_model_fallbacks",
            "Turns that moved to the next engine of their pipeline's chain",
            ["pipeline", "engine"],
            registry=registry,
        )
        self._retries = Counter(
            "veil_model_retries",
            "Model calls retried on the same engine after a retryable failure",
            ["pipeline", "engine"],
            registry=registry,
        )
        self._refusals = Counter(
            "veil_actor_overload_refusals",
            "Requests an actor host refused at a bound (mailbox: one key's; in_flight: all)",
            ["service", "bound"],
            registry=registry,
        )
        self._state = _StateCollector()
        registry.register(self._state)
        try:
            registry.register(_TaskCount())
        except ValueError:  # the gateway's metrics in the same registry count them already
            pass
        self._children: dict[tuple[object, ...], MetricWrapperBase] = {}

    def _child(self, metric: M, *labels: str) -> M:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child  # type: ignore[return-value]  # the same metric's child

    # -- counted where it happens -----------------------------------------------------

    def model_call(self, result: GenerateResult) -> None:
        """One generation's outcome, latency, first token and tokens."""
        engine, model = result.engine, result.upstream_model
        error = result.error
        if result.cancelled:
            outcome = "cancelled"
        elif error is not None:
            outcome = "error"
            self._child(self._errors, engine, str(error.status), error.code).inc()
        else:
            outcome = "ok"
        self._child(self._calls, engine, model, outcome).inc()
        self._child(self._latency, engine).observe(result.latency_ms / 1000)
        if result.ttft_ms is not None:
            self._child(self._ttft, engine).observe(result.ttft_ms / 1000)
        usage = result.usage
        if usage.prompt_tokens:
            self._child(self._tokens, engine, model, "prompt").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self._child(self._tokens, engine, model, "completion").inc(usage.completion_tokens)

    def fallback(self, pipeline: str, engine: str) -> None:
        """A turn moved on to `engine`, the next link of `pipeline`'s chain."""
        self._child(self._fallbacks, pipeline, engine).inc()

    def retry(self, pipeline: str, engine: str) -> None:
        self._child(self._retries, pipeline, engine).inc()

    def refused(self, service: str, bound: str) -> None:
        """A request `service`'s host refused at `bound` (bus.runtime.Overloaded)."""
        self._child(self._refusals, service, bound).inc()

    # -- read at scrape time ------------------------------------------------------------

    def watch_actors(
        self, service: str, active: Callable[[], int], depths: Callable[[], tuple[int, int]]
    ) -> None:
        """An actor host's live actors and mailbox depths (bus.runtime.ActorHost)."""
        self._state.hosts[service] = lambda: (active(), depths())

    def watch_running(self, service: str, running: Callable[[], int]) -> None:
        self._state.running[service] = running

    def watch_memory(self, stats: Callable[[], dict[str, object]]) -> None:
        """The memory projection's progress (its `lag_seconds` and `applied_seq`)."""
        self._state.memory = stats
