"""Routing: which pipeline answers a turn (`router.route`)."""

from __future__ import annotations

import msgspec

from bus.codec import Codec

__all__ = ["ROUTE_CODEC", "ROUTE_REPLY_CODEC", "RouteDecision", "RouteRequest"]


class RouteRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    text: str
    metadata: dict[str, str] = {}
    pinned: str | None = None


class RouteDecision(msgspec.Struct, frozen=True, kw_only=True):
    """The pipeline chosen for a turn, by which means, and what it won against."""

    pipeline: str
    # One of MEANS.
    means: str
    # The keyword, pattern or metadata that matched, the closest example, the classifier's answer.
    detail: str | None = None
    # Per candidate: semantic similarity when computed; 1.0 / 0.0 when rules decided.
    scores: dict[str, float] = {}
    runner_up: str | None = None
    runner_up_score: float | None = None


ROUTE_CODEC: Codec[RouteRequest] = Codec(RouteRequest)
ROUTE_REPLY_CODEC: Codec[RouteDecision] = Codec(RouteDecision)
