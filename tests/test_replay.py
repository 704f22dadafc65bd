"""What `veil replay` and `veil sessions` print, from stored events (no server)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from eventstore.events import ChatMessage, SessionOpened, TurnStarted
from eventstore.store import SessionInfo, StoredEvent
from veil.replay import render_replay, render_sessions, session_row

T0 = datetime(2026, 5, 1, tzinfo=UTC)


def opened(sid: str, at: datetime, seq: int, *, user: str | None = None) -> list[StoredEvent]:
    return [
        StoredEvent(
            seq=seq,
            event=SessionOpened(at=at, session_id=sid, tenant="acme", key_id="k", user_id=user),
        ),
        StoredEvent(
            seq=seq + 1,
            event=TurnStarted(
                at=at + timedelta(seconds=1),
                turn_id="t1",
                command_id="c1",
                model="veil-coach",
                messages=[ChatMessage(role="user", content="hi")],
                lease_until=at + timedelta(minutes=5),
            ),
        ),
    ]


def test_events_are_numbered_within_their_session() -> None:
    stored = opened("s1", T0, seq=83)
    text = list(render_replay("s1", stored, as_json=False))
    assert text[1].startswith("#1 ") and text[2].startswith("#2 ")
    assert "#83" not in "\n".join(text)
    rows = [json.loads(line) for line in render_replay("s1", stored, as_json=True)][:-1]
    assert [(r["n"], r["seq"]) for r in rows] == [(1, 83), (2, 84)]


def test_sessions_are_listed_by_last_activity_with_model_user_and_turns() -> None:
    old = opened("aaa", T0, seq=1, user="ann")
    new = opened("zzz", T0 + timedelta(days=1), seq=10)
    rows = [
        session_row(SessionInfo(tenant="acme", session_id="aaa", events=2, last_seq=2), old),
        session_row(SessionInfo(tenant="acme", session_id="zzz", events=2, last_seq=11), new),
    ]
    lines = list(render_sessions(rows, as_json=False))
    assert [line.split()[0] for line in lines[1:]] == ["zzz", "aaa"]  # the latest first
    assert lines[2].split()[1:5] == ["acme", "ann", "veil-coach", "0"]
    listed = [json.loads(line) for line in render_sessions(rows, as_json=True)]
    assert listed[0]["last_activity"] == "2026-05-02T00:00:01Z" and listed[1]["user"] == "ann"
