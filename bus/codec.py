"""JSON codecs for bus payloads: one encoder and one decoder per type, built once."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

__all__ = ["Codec", "DecodeError", "encode"]

T = TypeVar("T")

DecodeError = msgspec.DecodeError

_encoder = msgspec.json.Encoder()


def encode(obj: Any) -> bytes:
    """Encode any msgspec-supported object to JSON bytes."""
    return _encoder.encode(obj)


class Codec(Generic[T]):
    """Typed JSON codec for one message type or tagged union."""

    __slots__ = ("_decoder", "type")

    def __init__(self, type_: Any) -> None:
        self.type = type_
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(type_)

    def encode(self, obj: T) -> bytes:
        return _encoder.encode(obj)

    def decode(self, data: bytes | bytearray | memoryview | str) -> T:
        return self._decoder.decode(data)
