"""A server process's metrics registry, its metrics listener, and its tracer.

- Metrics: one Prometheus registry per process role (`new_registry`): `veil serve` gives
  it to its gateway and its workers alike, so one page shows both. The gateway serves it
  at /metrics to admin keys; `[server] metrics_port` (or `--metrics-port`) also serves it,
  without a key, on a listener of its own (`serve_metrics`): how `veil worker` is scraped.
- Traces: exported over OTLP (HTTP/protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
  `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and only then: with neither, no SDK is
  loaded and bus/telemetry.py makes no span. The SDK reads the other `OTEL_*` variables
  itself (`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_HEADERS`...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import structlog
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from bus import telemetry
from veil import __version__

__all__ = ["new_registry", "serve_metrics", "setup_tracing", "stop_tracing"]

log = structlog.get_logger("veil.server")

TRACE_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def new_registry() -> CollectorRegistry:
    """A registry for one process role, with the process's own figures (CPU, memory, open
    files, garbage collections) beside Veil's."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> web.AppRunner:
    """GET /metrics on host:port, without authentication (bind it where only the scraper
    reaches: loopback by default). The runner; `cleanup()` it to stop."""

    async def page(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    print(f"Metrics on http://{host}:{bound}/metrics", flush=True)
    return runner


def setup_tracing(role: str, env: Mapping[str, str] = os.environ) -> bool:
    """Install an OTLP-exporting tracer provider when the environment names an endpoint;
    whether it did. Needs the `otel` extra (the SDK and its exporter)."""
    if not any(env.get(name) for name in TRACE_ENDPOINT_VARIABLES):
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "tracing.unavailable",
            reason="OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not "
            "installed: pip install 'veil[otel]'",
        )
        return False
    resource = Resource.create(
        {
            "service.name": env.get("OTEL_SERVICE_NAME") or f"veil-{role}",
            "service.version": __version__,
        }
    )
    provider = TracerProvider(resource=resource)
    # Batched, on the SDK's own thread: a turn never waits for the collector.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    telemetry.install(provider)
    log.info("tracing.on", exporter="otlp/http")
    return True


def stop_tracing() -> None:
    """Flush the spans still queued and stop making new ones."""
    provider = telemetry.provider()
    telemetry.install(None)
    shutdown = getattr(provider, "shutdown", None)
    if callable(shutdown):
        shutdown()
