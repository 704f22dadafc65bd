"""Rate limit arithmetic on one scope's state: pure, with `now` given, no I/O.

Requests and tokens are counted over a sliding window of the last 60 s in 1-second
buckets: a fixed minute lets twice the limit through around its boundary, and a token
bucket lets a full burst through at once; 1-second buckets are exact to 1/60 of the
window. Concurrency is a set of leases with deadlines, so that a gateway that dies
frees its slots when they lapse.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

from contracts.keys import Quota
from contracts.limits import Buckets, ScopeState

__all__ = [
    "WINDOW",
    "Ask",
    "Refusal",
    "Standing",
    "Verdict",
    "charge",
    "duration_text",
    "estimate_tokens",
    "prune",
    "settle",
    "standing",
    "undo",
]

# Seconds the window spans.
WINDOW = 60
# Characters per token in an estimate (OpenAI's rule of thumb for English text).
CHARS_PER_TOKEN = 4

Dimension = Literal["requests", "tokens", "concurrency"]


class Ask(msgspec.Struct, frozen=True, kw_only=True):
    """One request asking to be admitted."""

    ticket: str
    tokens: int
    # When its concurrency lease lapses (epoch seconds), if nobody releases it first.
    lease_until: float


class Standing(msgspec.Struct, frozen=True, kw_only=True):
    """One limit's figures, as the x-ratelimit-* headers show them."""

    limit: int
    remaining: int
    # Seconds until the window holds nothing of what it counts now.
    reset: float


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    dimension: Dimension
    limit: int
    used: int
    requested: int
    # Seconds until the request would fit; None: it never fits (larger than the limit).
    retry_after: float | None


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    # The state to store: with the request counted when admitted, only pruned if refused.
    state: ScopeState
    # The second whose buckets counted it (where its settlement goes).
    second: int
    refusal: Refusal | None
    requests: Standing | None
    tokens: Standing | None

    @property
    def admitted(self) -> bool:
        return self.refusal is None


def estimate_tokens(chars: int, max_tokens: int | None) -> int:
    """A request's tokens before it runs: its text, plus all the reply may take (as
    OpenAI counts a request against its limits)."""
    return math.ceil(max(0, chars) / CHARS_PER_TOKEN) + max(0, max_tokens or 0)


def _second(now: float) -> int:
    return math.floor(now)


def _live(buckets: Buckets, now: float) -> Buckets:
    oldest = _second(now) - WINDOW + 1
    if not buckets or buckets[0][0] >= oldest:
        return buckets
    return tuple(b for b in buckets if b[0] >= oldest)


def _total(buckets: Buckets) -> int:
    return sum(amount for _, amount in buckets)


def _add(buckets: Buckets, second: int, amount: int, now: float) -> Buckets:
    """`amount` (negative: taken back) added to the bucket of `second`, if the window
    still holds it; a bucket never goes below zero."""
    if amount == 0 or second < _second(now) - WINDOW + 1:
        return buckets
    counts = dict(buckets)
    counts[second] = counts.get(second, 0) + amount
    return tuple(sorted((s, a) for s, a in counts.items() if a > 0))


def prune(state: ScopeState, now: float) -> ScopeState:
    """Without what left the window and the leases that lapsed."""
    leases = {t: until for t, until in state.leases.items() if until > now}
    return ScopeState(
        requests=_live(state.requests, now), tokens=_live(state.tokens, now), leases=leases
    )


def _wait(buckets: Buckets, used: int, asked: int, limit: int, now: float) -> float | None:
    """Seconds until `asked` more fits under `limit`, as the oldest buckets leave."""
    if asked > limit:
        return None
    excess = used + asked - limit
    freed = 0
    for second, amount in buckets:
        freed += amount
        if freed >= excess:
            return max(0.0, second + WINDOW - now)
    return float(WINDOW)


def _reset(buckets: Buckets, now: float) -> float:
    return max(0.0, buckets[-1][0] + WINDOW - now) if buckets else 0.0


def standing(
    state: ScopeState, quota: Quota, now: float
) -> tuple[Standing | None, Standing | None]:
    """(requests, tokens) figures of a pruned state, for the limits the quota sets."""
    requests = tokens = None
    if quota.rpm is not None:
        used = _total(state.requests)
        requests = Standing(
            limit=quota.rpm, remaining=max(0, quota.rpm - used), reset=_reset(state.requests, now)
        )
    if quota.tpm is not None:
        used = _total(state.tokens)
        tokens = Standing(
            limit=quota.tpm, remaining=max(0, quota.tpm - used), reset=_reset(state.tokens, now)
        )
    return requests, tokens


def _refusals(state: ScopeState, quota: Quota, ask: Ask, now: float) -> list[Refusal]:
    found = []
    if quota.concurrency is not None and len(state.leases) + 1 > quota.concurrency:
        # When a running request ends is unknown: ask again in a second.
        found.append(
            Refusal(
                dimension="concurrency",
                limit=quota.concurrency,
                used=len(state.leases),
                requested=1,
                retry_after=1.0 if quota.concurrency > 0 else None,
            )
        )
    if quota.rpm is not None:
        used = _total(state.requests)
        if used + 1 > quota.rpm:
            wait = _wait(state.requests, used, 1, quota.rpm, now)
            found.append(
                Refusal(
                    dimension="requests", limit=quota.rpm, used=used, requested=1, retry_after=wait
                )
            )
    if quota.tpm is not None:
        used = _total(state.tokens)
        if used + ask.tokens > quota.tpm:
            wait = _wait(state.tokens, used, ask.tokens, quota.tpm, now)
            found.append(
                Refusal(
                    dimension="tokens",
                    limit=quota.tpm,
                    used=used,
                    requested=ask.tokens,
                    retry_after=wait,
                )
            )
    return found


def _longest(refusals: list[Refusal]) -> Refusal:
    """The refusal that lasts longest: a request that never fits before any other."""
    return max(refusals, key=lambda r: math.inf if r.retry_after is None else r.retry_after)


def charge(state: ScopeState, quota: Quota, ask: Ask, now: float) -> Verdict:
    """Admit the request (count it, lease a slot) or say which limit refuses it and for
    how long. Only the limits the quota sets are counted."""
    state = prune(state, now)
    refusals = _refusals(state, quota, ask, now)
    if refusals:
        requests, tokens = standing(state, quota, now)
        return Verdict(
            state=state,
            second=_second(now),
            refusal=_longest(refusals),
            requests=requests,
            tokens=tokens,
        )
    second = _second(now)
    admitted = ScopeState(
        requests=_add(state.requests, second, 1, now) if quota.rpm is not None else (),
        tokens=_add(state.tokens, second, ask.tokens, now) if quota.tpm is not None else (),
        leases=(
            {**state.leases, ask.ticket: ask.lease_until} if quota.concurrency is not None else {}
        ),
    )
    requests, tokens = standing(admitted, quota, now)
    return Verdict(state=admitted, second=second, refusal=None, requests=requests, tokens=tokens)


def undo(
    state: ScopeState, ticket: str, second: int, requests: int, tokens: int, now: float
) -> ScopeState:
    """Take back an admission that another scope refused."""
    state = prune(state, now)
    leases = {t: until for t, until in state.leases.items() if t != ticket}
    return ScopeState(
        requests=_add(state.requests, second, -requests, now),
        tokens=_add(state.tokens, second, -tokens, now),
        leases=leases,
    )


def settle(
    state: ScopeState, ticket: str, second: int, tokens_delta: int, now: float
) -> ScopeState:
    """A request ended: free its slot, and correct its tokens by what it really used
    (in the bucket it was charged in, if the window still holds it)."""
    state = prune(state, now)
    leases = {t: until for t, until in state.leases.items() if t != ticket}
    return ScopeState(
        requests=state.requests,
        tokens=_add(state.tokens, second, tokens_delta, now),
        leases=leases,
    )


def duration_text(seconds: float) -> str:
    """A duration as OpenAI's x-ratelimit-reset-* headers write it: "20ms", "1s",
    "6m0s", "1h2m3.5s" (Go's notation), to the millisecond."""
    ms = max(0, round(seconds * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
