"""A session state's digest: one short string that says whether two folds agree.

An auditor compares the live actor's state (`GET /v1/sessions/{id}` with an audit or
admin key) with a fold of the log alone (`veil replay --digest`): equal digests mean the
log rebuilds exactly what the actor holds. MessagePack with sorted keys and fields: the
encoding of equal states is equal whatever order their dicts were filled in.
"""

from __future__ import annotations

import hashlib

import msgspec

from actors.session import SessionState

__all__ = ["state_digest"]

_encoder = msgspec.msgpack.Encoder(order="sorted")


def state_digest(state: SessionState) -> str:
    """The sha256 (hex) of the state's canonical MessagePack encoding."""
    return hashlib.sha256(_encoder.encode(state)).hexdigest()
