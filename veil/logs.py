"""Logging for the processes: structlog, as one JSON object per line or for a person.

Server roles (`serve`, `gateway`, `worker`) write JSON to stderr unless stderr is a
terminal (then the console format), or as `--log-format` / `VEIL_LOG_FORMAT` say. Every
line of a request's or a turn's work carries its ids: `request_id` (bus/telemetry.py
keeps it in a context variable, sent from the gateway to the workers), and
`session_id`, `turn_id`, `tenant`, `key_id` (bound with structlog's contextvars by the
gateway and the session actor). What people wrote and what the model answered appear
only at debug level (`--log-level debug` / `VEIL_LOG_LEVEL=debug`).

Libraries that log through the standard `logging` module, and Python's warnings, come
out in the same format: a JSON log is JSON on every line.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal, TextIO

import msgspec
import structlog
from structlog.typing import Processor

from bus import telemetry

__all__ = ["FORMATS", "LEVELS", "configure_logging", "default_format"]

FORMATS = ("json", "console")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS["error"] = logging.ERROR

_ENCODER = msgspec.json.Encoder(enc_hook=repr)


def _to_json(event: Mapping[str, Any], **_: Any) -> str:
    # msgspec: several times faster than the json module; what it cannot encode, it reprs.
    return _ENCODER.encode(event).decode()


def _add_request_id(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The id of the request whose work this is, read when the line is written (nothing
    is bound per request for it)."""
    rid = telemetry.request_id()
    if rid is not None:
        event.setdefault("request_id", rid)
    return event


def default_format(stream: TextIO = sys.stderr, env: Mapping[str, str] = os.environ) -> str:
    """`VEIL_LOG_FORMAT` when set, else JSON unless `stream` is a terminal."""
    chosen = env.get("VEIL_LOG_FORMAT", "").strip().lower()
    if chosen:
        return chosen
    return "console" if stream.isatty() else "json"


def configure_logging(level: int, log_format: Literal["json", "console"] | str = "console") -> None:
    """Configure structlog (and the standard logging module) for this process."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_request_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if log_format == "json":
        # Plain tracebacks as text, never with frames' locals (they hold conversations).
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer(serializer=_to_json)
    else:
        # Plain tracebacks: the rich one, with every frame's locals, took ~0.5 s of the
        # event loop per exception (bench/abuse.py, nats-server killed under load).
        renderer = structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        processors=[*shared, renderer],
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # The standard library's loggers (aiohttp's, asyncio's, a library's) in the same format.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
