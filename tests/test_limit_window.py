"""The rate limit arithmetic (edge/limit_window.py): given a scope's state, when a request
asks, charges, settles or is taken back at a given time, then what is counted."""

from __future__ import annotations

import pytest

from contracts.keys import Quota
from contracts.limits import LIMIT_STATE_CODEC, ScopeState
from edge.limit_window import (
    Ask,
    Verdict,
    charge,
    duration_text,
    estimate_tokens,
    prune,
    settle,
    standing,
    undo,
)

T0 = 1_800_000_000.0  # any wall-clock second


def ask(ticket: str = "t", tokens: int = 0, lease_until: float = T0 + 3600) -> Ask:
    return Ask(ticket=ticket, tokens=tokens, lease_until=lease_until)


def admit_all(state: ScopeState, quota: Quota, times: list[float], tokens: int = 0) -> ScopeState:
    for i, now in enumerate(times):
        verdict = charge(state, quota, ask(f"t{i}", tokens), now)
        assert verdict.admitted, (i, now, verdict.refusal)
        state = verdict.state
    return state


def test_requests_are_admitted_up_to_the_limit_then_refused() -> None:
    quota = Quota(rpm=3)
    state = admit_all(ScopeState(), quota, [T0, T0 + 0.1, T0 + 10])
    verdict = charge(state, quota, ask(), T0 + 20)
    assert not verdict.admitted
    assert verdict.refusal is not None and verdict.refusal.dimension == "requests"
    assert (verdict.refusal.limit, verdict.refusal.used, verdict.refusal.requested) == (3, 3, 1)
    # The two requests of second T0 leave the window at T0 + 60: one slot then.
    assert verdict.refusal.retry_after == pytest.approx(40.0)
    assert verdict.state == prune(state, T0 + 20)  # a refusal counts nothing


def test_the_window_slides_second_by_second() -> None:
    quota = Quota(rpm=4)
    state = admit_all(ScopeState(), quota, [T0, T0 + 1, T0 + 2, T0 + 3])
    assert not charge(state, quota, ask(), T0 + 59.99).admitted
    at_60 = charge(state, quota, ask(), T0 + 60)  # second T0 left; T0+1.. still count
    assert at_60.admitted and at_60.requests is not None and at_60.requests.remaining == 0
    assert not charge(at_60.state, quota, ask(), T0 + 60.5).admitted


def test_no_double_burst_around_a_minute_boundary() -> None:
    quota = Quota(rpm=60)
    state = admit_all(ScopeState(), quota, [T0 + 59.5] * 60)
    # A fixed window starting at T0 + 60 would let another 60 through here.
    for now in (T0 + 60.0, T0 + 61.0, T0 + 118.99):
        assert not charge(state, quota, ask(), now).admitted
    assert charge(state, quota, ask(), T0 + 119.0).admitted


def test_tokens_are_counted_and_refused_past_the_limit() -> None:
    quota = Quota(tpm=1000)
    state = admit_all(ScopeState(), quota, [T0, T0 + 5], tokens=400)
    verdict = charge(state, quota, ask(tokens=300), T0 + 6)
    assert verdict.refusal is not None and verdict.refusal.dimension == "tokens"
    assert (verdict.refusal.used, verdict.refusal.requested) == (800, 300)
    assert verdict.refusal.retry_after == pytest.approx(54.0)  # T0's 400 leave at T0 + 60
    assert charge(state, quota, ask(tokens=200), T0 + 6).admitted


def test_a_request_larger_than_the_limit_never_fits() -> None:
    verdict = charge(ScopeState(), Quota(tpm=1000), ask(tokens=1001), T0)
    assert verdict.refusal is not None and verdict.refusal.retry_after is None


def test_the_longest_refusal_is_the_one_reported() -> None:
    quota = Quota(rpm=1, tpm=100)
    state = admit_all(ScopeState(), quota, [T0], tokens=10)
    verdict = charge(state, quota, ask(tokens=1000), T0 + 1)
    assert verdict.refusal is not None and verdict.refusal.dimension == "tokens"


def test_only_the_limits_a_quota_sets_are_counted() -> None:
    verdict = charge(ScopeState(), Quota(rpm=5), ask(tokens=100), T0)
    assert verdict.state.requests == ((int(T0), 1),)
    assert verdict.state.tokens == () and verdict.state.leases == {}
    assert verdict.tokens is None and verdict.requests is not None


def test_concurrency_leases_slots_until_released_or_lapsed() -> None:
    quota = Quota(concurrency=2)
    first = charge(ScopeState(), quota, ask("a", lease_until=T0 + 100), T0)
    second = charge(first.state, quota, ask("b", lease_until=T0 + 10), T0 + 1)
    refused = charge(second.state, quota, ask("c"), T0 + 2)
    assert refused.refusal is not None and refused.refusal.dimension == "concurrency"
    assert refused.refusal.retry_after == 1.0
    # b's gateway died: its lease lapses at T0 + 10.
    assert charge(second.state, quota, ask("c"), T0 + 10.5).admitted
    # a ends: its slot is free at once.
    released = settle(second.state, "a", int(T0), 0, T0 + 3)
    assert set(released.leases) == {"b"}
    assert charge(released, quota, ask("c"), T0 + 3).admitted


def test_settlement_trues_up_tokens_in_the_bucket_they_were_charged_in() -> None:
    quota = Quota(tpm=10_000)
    state = admit_all(ScopeState(), quota, [T0], tokens=500)
    state = admit_all(state, quota, [T0 + 30], tokens=100)
    more = settle(state, "t0", int(T0), 250, T0 + 40)  # used 750
    assert more.tokens == ((int(T0), 750), (int(T0) + 30, 100))
    less = settle(state, "t0", int(T0), -480, T0 + 40)  # used 20
    assert less.tokens == ((int(T0), 20), (int(T0) + 30, 100))
    nothing = settle(state, "t0", int(T0), -500, T0 + 40)
    assert nothing.tokens == ((int(T0) + 30, 100),)
    # Past the window, a correction has nowhere to go.
    late = settle(state, "t0", int(T0), 9000, T0 + 65)
    assert late.tokens == ((int(T0) + 30, 100),)


def test_a_bucket_never_goes_below_zero() -> None:
    state = admit_all(ScopeState(), Quota(tpm=1000), [T0], tokens=10)
    assert settle(state, "t0", int(T0), -50, T0 + 1).tokens == ()


def test_undo_takes_an_admission_back() -> None:
    quota = Quota(rpm=10, tpm=1000, concurrency=3)
    state = admit_all(ScopeState(), quota, [T0], tokens=100)
    verdict = charge(state, quota, ask("x", tokens=300), T0 + 2)
    back = undo(verdict.state, "x", verdict.second, 1, 300, T0 + 2.5)
    assert back == state


def test_standing_shows_the_limit_what_remains_and_when_it_resets() -> None:
    quota = Quota(rpm=10, tpm=1000)
    state = admit_all(ScopeState(), quota, [T0, T0 + 20], tokens=100)
    requests, tokens = standing(prune(state, T0 + 30), quota, T0 + 30)
    assert requests is not None and tokens is not None
    assert (requests.limit, requests.remaining) == (10, 8)
    assert (tokens.limit, tokens.remaining) == (1000, 800)
    assert requests.reset == pytest.approx(50.0)  # the newest second leaves at T0 + 80
    empty, _ = standing(ScopeState(), quota, T0)
    assert empty is not None and (empty.remaining, empty.reset) == (10, 0.0)


def test_a_verdict_tells_the_second_it_counted_in() -> None:
    verdict: Verdict = charge(ScopeState(), Quota(rpm=1), ask(), T0 + 7.9)
    assert verdict.second == int(T0) + 7


def test_the_state_round_trips_through_its_codec() -> None:
    state = admit_all(ScopeState(), Quota(rpm=5, tpm=500, concurrency=2), [T0], tokens=40)
    assert LIMIT_STATE_CODEC.decode(LIMIT_STATE_CODEC.encode(state)) == state
    assert LIMIT_STATE_CODEC.encode(ScopeState()) == b"{}"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (0.9994, "999ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.999, "59.999s"),
        (360, "6m0s"),
        (61.25, "1m1.25s"),
        (3723.5, "1h2m3.5s"),
        (-3, "0s"),
    ],
)
def test_durations_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


def test_an_estimate_counts_the_text_and_all_the_reply_may_take() -> None:
    assert estimate_tokens(0, None) == 0
    assert estimate_tokens(9, None) == 3  # 9 / 4, rounded up
    assert estimate_tokens(400, 1000) == 1100
    assert estimate_tokens(-5, -5) == 0
