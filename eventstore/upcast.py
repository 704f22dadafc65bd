"""Reading events of older shapes: the one decoder every reader of a log uses.

Logs are kept for years, so a shape that changes keeps its old records
readable: a record the current types refuse is read as a plain mapping, brought
to today's shape here, then decoded again. Only old records take that path.

Shapes changed so far:
- `model.called` carried the call's fields at its top level; they are now its `call`.
- `reply.completed` carried its call's fields (`engine`, `upstream_model`,
  `latency_ms`, `ttft_ms`) at its top level; they are now its `call`. Records older
  still carry no call at all (a `model.called` just before holds it).
"""

from __future__ import annotations

from typing import Any

import msgspec

from eventstore.events import EventUnion

__all__ = ["EVENT_CODEC", "EventCodec"]

_CALL_FIELDS = (
    "engine",
    "upstream_model",
    "latency_ms",
    "ttft_ms",
    "usage",
    "finish_reason",
    "error",
    "status",
    "purpose",
)
_REPLY_CALL_FIELDS = ("engine", "upstream_model", "latency_ms", "ttft_ms")

_encoder = msgspec.json.Encoder()


def _model_called(record: dict[str, Any]) -> dict[str, Any]:
    call = {name: record.pop(name) for name in _CALL_FIELDS if name in record}
    return {**record, "call": call}


def _reply_completed(record: dict[str, Any]) -> dict[str, Any]:
    flat = {name: record.pop(name) for name in _REPLY_CALL_FIELDS if name in record}
    if flat.get("engine") is None:
        return {**record, "call": None}
    call = {
        "engine": flat["engine"],
        "upstream_model": flat.get("upstream_model") or "",
        "latency_ms": flat.get("latency_ms") or 0.0,
        "ttft_ms": flat.get("ttft_ms"),
        "usage": record.get("usage"),
        "finish_reason": record.get("finish_reason"),
    }
    return {**record, "call": call}


_UPCASTERS = {"model.called": _model_called, "reply.completed": _reply_completed}


class EventCodec:
    """Encodes events as they are written today; decodes today's and every older shape."""

    __slots__ = ("_decoder", "_record")

    def __init__(self) -> None:
        self._decoder: msgspec.json.Decoder[EventUnion] = msgspec.json.Decoder(EventUnion)
        self._record: msgspec.json.Decoder[dict[str, Any]] = msgspec.json.Decoder(dict[str, Any])

    def encode(self, event: EventUnion) -> bytes:
        return _encoder.encode(event)

    def decode(self, data: bytes | bytearray | memoryview | str) -> EventUnion:
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError:
            record = self._record.decode(data)
            upcast = _UPCASTERS.get(record.get("type", ""))
            if upcast is None:
                raise
            return self._decoder.decode(_encoder.encode(upcast(record)))


EVENT_CODEC = EventCodec()
