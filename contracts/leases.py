"""Turn leases: whether a lease's holder still runs its turn (`chat.worker.<id>.leases`)."""

from __future__ import annotations

import msgspec

from bus.codec import Codec

__all__ = ["LEASE_PROBE_CODEC", "LEASE_REPLY_CODEC", "LeaseProbe", "LeaseReply"]

# The same probe, sent to every worker on TURNS_WHERE: whoever has the turn in hand
# (waiting in a mailbox or running) answers; the others stay silent.


class LeaseProbe(msgspec.Struct, frozen=True, kw_only=True):
    turn_id: str


class LeaseReply(msgspec.Struct, frozen=True, kw_only=True):
    running: bool


LEASE_PROBE_CODEC: Codec[LeaseProbe] = Codec(LeaseProbe)
LEASE_REPLY_CODEC: Codec[LeaseReply] = Codec(LeaseReply)
