"""Rate limits shared by every gateway: what the key-value bucket holds for one scope.

One entry per scope (an API key, a tenant) in the JetStream key-value bucket
VEIL_LIMITS, changed only by compare-and-set on its revision (edge/limits.py); the
arithmetic on it is edge/limit_window.py.
"""

from __future__ import annotations

import msgspec

from bus.codec import Codec

__all__ = ["LIMIT_STATE_CODEC", "Buckets", "ScopeState"]

# (second since the epoch, amount) pairs, oldest first, one per second that counted.
Buckets = tuple[tuple[int, int], ...]


class ScopeState(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What one scope used over the last 60 s, and the requests it runs now."""

    requests: Buckets = ()
    tokens: Buckets = ()
    # Running requests: ticket -> the time (epoch seconds) its lease lapses, so that the
    # slots of a gateway that died free themselves.
    leases: dict[str, float] = {}


LIMIT_STATE_CODEC: Codec[ScopeState] = Codec(ScopeState)
