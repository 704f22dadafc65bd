"""The `veil` command: serve, gateway, worker, replay, sessions, backup, restore."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

from config import Config, ConfigError, load_config
from config.loader import tls_files_problem
from veil.backup import add_backup_parser
from veil.keys import add_keys_parser
from veil.logs import FORMATS, LEVELS, configure_logging, default_format
from veil.roles import ROLES, parse_roles
from veil.usage import add_usage_parser

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="veil", description="OpenAI-compatible chat server with memory and agents."
    )
    parser.add_argument("--config", help="TOML config file (or VEIL_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        (
            "serve",
            (
                "run everything on this machine: one process, or --workers N "
                "(embeds nats-server unless VEIL_NATS_URL is set)"
            ),
        ),
        ("gateway", "run the HTTP gateway only, against VEIL_NATS_URL"),
        ("worker", "run the actors only, against VEIL_NATS_URL"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument(
            "--config", default=argparse.SUPPRESS, help="TOML config file (or VEIL_CONFIG)"
        )
        if name != "worker":
            p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
            p.add_argument(
                "--port", type=int, help="port to listen on (default 8000; 0 picks a free one)"
            )
            p.add_argument(
                "--tls-cert",
                help="serve HTTPS with this PEM certificate chain (with --tls-key; "
                "default: [server] tls_cert or VEIL_TLS_CERT)",
            )
            p.add_argument("--tls-key", help="the certificate's PEM private key")
        if name == "serve":
            p.add_argument(
                "--workers",
                default="1",
                help="processes serving turns: 1 (default) runs everything in one process; "
                "N > 1 starts N worker processes and one memory process beside the gateway; "
                "auto: one per core",
            )
        if name == "worker":
            p.add_argument(
                "--roles",
                default=",".join(ROLES),
                help=f"comma-separated roles to run (default: all of {','.join(ROLES)})",
            )
        p.add_argument(
            "--log-format",
            choices=FORMATS,
            help="json: one object per line; console: for a person "
            "(default: VEIL_LOG_FORMAT, else json unless stderr is a terminal)",
        )
        p.add_argument(
            "--log-level",
            choices=list(LEVELS),
            help="default: VEIL_LOG_LEVEL, else info; debug also logs messages and replies",
        )
        p.add_argument(
            "--metrics-port",
            type=int,
            help="serve Prometheus metrics at /metrics on this port, without a key "
            "(default: [server] metrics_port; 0 picks a free one)",
        )
    replay = sub.add_parser(
        "replay", help="print a session's events in order and the state rebuilt from them"
    )
    replay.add_argument("session_id")
    replay.add_argument(
        "--tenant", help="the session's tenant (needed only when several tenants use the id)"
    )
    replay.add_argument("--json", action="store_true", help="one JSON object per line")
    replay.add_argument(
        "--digest",
        action="store_true",
        help="print only the digest of the rebuilt state (GET /v1/sessions/{id} shows the "
        "live actor's as state_digest to audit keys)",
    )
    replay.add_argument(
        "--config", default=argparse.SUPPRESS, help="TOML config file (or VEIL_CONFIG)"
    )
    reindex = sub.add_parser("reindex", help="drop the memory index and rebuild it from the log")
    reindex.add_argument(
        "--config", default=argparse.SUPPRESS, help="TOML config file (or VEIL_CONFIG)"
    )
    kb = sub.add_parser("kb", help="knowledge collections: add, ls, rm, reindex")
    kb.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file (or VEIL_CONFIG)")
    kb_sub = kb.add_subparsers(dest="kb_action", required=True)
    kb_add = kb_sub.add_parser("add", help="ingest files or folders (text, Markdown, HTML, PDF)")
    kb_add.add_argument("collection")
    kb_add.add_argument("paths", nargs="+")
    kb_ls = kb_sub.add_parser("ls", help="list collections, or one collection's documents")
    kb_ls.add_argument("collection", nargs="?")
    kb_rm = kb_sub.add_parser("rm", help="remove files or folders from a collection")
    kb_rm.add_argument("collection")
    kb_rm.add_argument("paths", nargs="+")
    kb_sub.add_parser("reindex", help="rebuild the knowledge index from the KB_EVENTS log")
    add_keys_parser(sub)
    add_backup_parser(sub)
    add_usage_parser(sub)
    sessions = sub.add_parser("sessions", help="list sessions")
    sessions.add_argument("--tenant", help="only this tenant's sessions")
    sessions.add_argument("--json", action="store_true", help="one JSON object per line")
    sessions.add_argument(
        "--config", default=argparse.SUPPRESS, help="TOML config file (or VEIL_CONFIG)"
    )
    return parser


def _logging_of(args: argparse.Namespace) -> tuple[int, str]:
    """Level and format: a server role's flags, else VEIL_LOG_LEVEL / VEIL_LOG_FORMAT, else
    info and JSON (console on a terminal); one-shot commands: warnings, for a person."""
    if args.command not in ("serve", "gateway", "worker"):
        return logging.WARNING, "console"
    level = (args.log_level or os.environ.get("VEIL_LOG_LEVEL") or "info").strip().lower()
    log_format = args.log_format or default_format()
    if level not in LEVELS:
        raise SystemExit(f"veil: log level {level!r} is not one of {', '.join(LEVELS)}")
    if log_format not in FORMATS:
        raise SystemExit(f"veil: log format {log_format!r} is not one of {', '.join(FORMATS)}")
    return LEVELS[level], log_format


@contextlib.asynccontextmanager
async def _log_connection(config: Config, *, create: bool = False) -> AsyncIterator[str]:
    """A NATS URL with the session log: the configured one, the running server's, or a temporary one."""
    if config.nats_url:
        yield config.nats_url
        return
    url_file = Path(config.data_dir) / "nats.url"
    if url_file.exists():
        yield url_file.read_text().strip()
        return
    from veil.server import embedded_nats

    server = embedded_nats(config)
    if not server.store_dir.exists() and not create:
        raise SystemExit(f"no Veil data in {config.data_dir} (set VEIL_DATA_DIR or VEIL_NATS_URL)")
    url = await server.astart()
    try:
        yield url
    finally:
        server.stop()


async def _replay(
    config: Config, session_id: str, tenant: str | None, as_json: bool, digest: bool = False
) -> int:
    from actors.memory.items import item_text
    from bus.connection import connect
    from bus.subjects import is_valid_id
    from eventstore.jetstream import JetStreamEventStore
    from veil.replay import referenced_sessions, render_replay, replay_digest

    if not is_valid_id(session_id):
        print(f"invalid session id: {session_id!r}", file=sys.stderr)
        return 2
    if tenant is not None and not is_valid_id(tenant):
        print(f"invalid tenant: {tenant!r}", file=sys.stderr)
        return 2
    async with _log_connection(config) as url:
        nc = await connect(url, name="veil-replay")
        try:
            store = JetStreamEventStore(nc.jetstream(), nc)
            # Session ids are per tenant: without --tenant, the id must name one session.
            tenants = [tenant] if tenant is not None else await store.tenants_of(session_id)
            if len(tenants) > 1:
                print(
                    f"session {session_id} exists in several tenants ({', '.join(tenants)}): "
                    "name one with --tenant",
                    file=sys.stderr,
                )
                return 2
            events = await store.load(tenants[0], session_id) if tenants else []
            # Memories recalled from other sessions (always of the same tenant) are
            # references: resolve them while they exist.
            others = {
                sid: {s.seq: s.event for s in await store.load(tenants[0], sid)}
                for sid in referenced_sessions(events)
            }
        finally:
            await nc.drain()
    if not events:
        print(f"no events for session {session_id}", file=sys.stderr)
        return 1

    if digest:
        print(replay_digest(events))
        return 0

    def resolve(sid: str, seq: int) -> str | None:
        return item_text(others.get(sid, {}), seq)

    for line in render_replay(session_id, events, as_json=as_json, resolve=resolve):
        print(line)
    return 0


async def _sessions(config: Config, tenant: str | None, as_json: bool) -> int:
    from bus.connection import connect
    from eventstore.jetstream import JetStreamEventStore, ensure_stream
    from veil.replay import render_sessions, session_row

    async with _log_connection(config) as url:
        nc = await connect(url, name="veil-sessions")
        try:
            js = nc.jetstream()
            await ensure_stream(js)
            store = JetStreamEventStore(js, nc)
            infos = [i for i in await store.sessions() if tenant in (None, i.tenant)]
            rows = [
                session_row(info, await store.load(info.tenant, info.session_id)) for info in infos
            ]
        finally:
            await nc.drain()
    for line in render_sessions(rows, as_json=as_json):
        print(line)
    return 0


async def _kb(config: Config, action: str, collection: str | None, paths: list[str]) -> int:
    from veil.kb import kb_main

    async with _log_connection(config, create=action == "add") as url:
        return await kb_main(config, url, action, collection, paths)


async def _keys(config: Config, args: argparse.Namespace) -> int:
    from bus.connection import connect
    from veil.keys import keys_main

    async with _log_connection(config, create=args.keys_action == "create") as url:
        nc = await connect(url, name="veil-keys")
        try:
            return await keys_main(nc, args)
        finally:
            await nc.drain()


async def _usage(config: Config, args: argparse.Namespace) -> int:
    from veil.usage import usage_main

    async with _log_connection(config) as url:
        return await usage_main(config, url, args)


async def _backup(config: Config, args: argparse.Namespace) -> int:
    from veil.backup import backup_main, restore_main

    directory = Path(args.directory)
    if args.command == "backup":
        return await backup_main(directory, lambda: _log_connection(config))
    return await restore_main(
        config, directory, args.force, lambda: _log_connection(config, create=True)
    )


async def _reindex(config: Config) -> int:
    from veil.reindex import reindex

    async with _log_connection(config) as url:
        events, memories = await reindex(config, url)
    print(f"Reindexed {events} events into {memories} memories.")
    return 0


def _workers_of(text: str) -> int:
    """`--workers`: a count of at least 1, or `auto` (one per core)."""
    if text == "auto":
        from veil.supervisor import default_workers

        return default_workers()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--workers {text!r} is not a count of at least 1 or auto")
    return int(text)


def _worker_args(args: argparse.Namespace, config: Config) -> list[str]:
    """What `veil serve --workers N` passes on to its worker children."""
    out: list[str] = []
    if args.config:
        out += ["--config", args.config]
    if args.log_format:
        out += ["--log-format", args.log_format]
    if args.log_level:
        out += ["--log-level", args.log_level]
    if args.metrics_port is not None or config.server.metrics_port is not None:
        # The parent's port (from the flag or the config file) is taken: a free one each.
        out += ["--metrics-port", "0"]
    return out


def _run_fast(main: Coroutine[Any, Any, None]) -> None:
    """Run a server role on uvloop where it is installed (VEIL_EVENT_LOOP=asyncio opts out)."""
    if os.environ.get("VEIL_EVENT_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Everything Veil writes (logs, indexes, JetStream, uploads) holds conversations:
    # owner-only, nats-server's files included (it inherits the mask).
    os.umask(0o077)
    if args.command not in ("serve", "gateway", "worker"):
        # A one-shot command piped into `head` ends quietly when the reader does, as
        # Unix tools do, instead of with a BrokenPipeError traceback.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # Servers say what they do; one-shot commands only what went wrong.
    try:
        configure_logging(*_logging_of(args))
    except SystemExit as refusal:
        print(refusal, file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"veil: invalid configuration: {error}", file=sys.stderr)
        return 2
    if args.command in ("serve", "gateway", "worker"):
        from veil.server import run_role

        host = getattr(args, "host", None) or config.server.host
        if args.metrics_port is not None:
            if not 0 <= args.metrics_port <= 65535:
                print(f"veil: --metrics-port {args.metrics_port} is not a port", file=sys.stderr)
                return 2
            config.server.metrics_port = args.metrics_port
        port = getattr(args, "port", None)
        port = config.server.port if port is None else port
        if getattr(args, "tls_cert", None) or getattr(args, "tls_key", None):
            config.server.tls_cert = args.tls_cert or config.server.tls_cert
            config.server.tls_key = args.tls_key or config.server.tls_key
            problem = tls_files_problem(config.server.tls_cert, config.server.tls_key)
            if problem is not None:
                print(f"veil: {problem}", file=sys.stderr)
                return 2
        from veil.server import make_private

        make_private(Path(config.data_dir))
        try:
            roles = parse_roles(args.roles) if args.command == "worker" else None
            workers = _workers_of(args.workers) if args.command == "serve" else 1
        except ValueError as error:
            print(f"veil: {error}", file=sys.stderr)
            return 2
        try:
            _run_fast(
                run_role(
                    config,
                    args.command,
                    host,
                    port,
                    roles=roles,
                    workers=workers,
                    worker_args=_worker_args(args, config),
                )
            )
        except KeyboardInterrupt:
            pass
        return 0
    if args.command == "replay":
        return asyncio.run(_replay(config, args.session_id, args.tenant, args.json, args.digest))
    if args.command == "sessions":
        return asyncio.run(_sessions(config, args.tenant, args.json))
    if args.command == "reindex":
        return asyncio.run(_reindex(config))
    if args.command == "usage":
        return asyncio.run(_usage(config, args))
    if args.command in ("backup", "restore"):
        return asyncio.run(_backup(config, args))
    if args.command == "keys":
        return asyncio.run(_keys(config, args))
    if args.command == "kb":
        return asyncio.run(
            _kb(
                config,
                args.kb_action,
                getattr(args, "collection", None),
                getattr(args, "paths", []),
            )
        )
    return 2


if __name__ == "__main__":
    sys.exit(main())
