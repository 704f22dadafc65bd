"""From log events to usage: which event adds what to which ledger row. No I/O.

A row is one (UTC day, tenant, key, user, public model, pipeline, engine, upstream
model). Every model call adds its tokens and their cost to the row of the turn it
served (a failed attempt, a tool step, a summary, a fact extraction, the answer's
call); every turn that ends (answered, failed or cancelled) adds one request, to the
row of its last model call. A turn is billed to the key and the user that asked for
it (`TurnStarted`); a log written before turns recorded them bills the session's
opener.

Money is counted in whole nano-dollars, rounded per call: integer sums are the same in
whatever batches they are added, so a rebuild from the log gives identical rows.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import NamedTuple

from eventstore.events import (
    EventUnion,
    ModelCall,
    ModelCalled,
    PipelineChosen,
    ReplyCompleted,
    SessionOpened,
    TurnCancelled,
    TurnFailed,
    TurnStarted,
)

__all__ = ["NANO", "Delta", "Ledger", "Prices", "RowKey", "utc_day"]

# Nano-dollars in a dollar; a price per million tokens times this is per token in nano-dollars
# over a million: price * 1000 nano-dollars per token.
NANO = 1_000_000_000
# Sessions whose owner and recent turns are kept; another is read again from its log.
MAX_SESSIONS = 10_000
# Turns kept per session: a fact extraction may land after the next turn started.
MAX_TURNS = 8


class RowKey(NamedTuple):
    day: date
    tenant: str
    key_id: str
    # "" when the turn named no user (SQLite keys cannot be NULL).
    user: str
    model: str
    pipeline: str
    engine: str
    upstream_model: str


class Delta(NamedTuple):
    row: RowKey
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_nusd: int = 0


class Prices:
    """USD per million tokens by upstream model; an "engine/model" entry wins over "model"."""

    def __init__(self, table: Mapping[str, tuple[float, float]] | None = None) -> None:
        self._table = dict(table or {})

    def cost_nusd(self, call: ModelCall, prompt: int, completion: int) -> int:
        price = self._table.get(f"{call.engine}/{call.upstream_model}") or self._table.get(
            call.upstream_model
        )
        if price is None:
            return 0
        return round((prompt * price[0] + completion * price[1]) * (NANO / 1_000_000))


def utc_day(moment: datetime) -> date:
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC).date()


@dataclass(slots=True)
class _Turn:
    key_id: str
    user: str
    model: str
    pipeline: str = ""
    # The last model call's, where the turn's request is counted.
    engine: str = ""
    upstream_model: str = ""


@dataclass(slots=True)
class _Session:
    tenant: str
    key_id: str
    user: str
    turns: OrderedDict[str, _Turn] = field(default_factory=OrderedDict)


class Ledger:
    """Folds events, session by session, into deltas of ledger rows.

    It keeps what it needs of each session (its owner, its recent turns) for the events
    that follow; `knows` says whether a session's earlier events must be `learn`ed first
    (a projection that resumes mid-log reads them from the session's own log).
    """

    def __init__(self, prices: Prices | None = None) -> None:
        self._prices = prices or Prices()
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def knows(self, session_id: str) -> bool:
        return session_id in self._sessions

    def forget(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def learn(self, session_id: str, events: Iterable[EventUnion]) -> None:
        """Take in a session's earlier events for their context only: nothing is counted."""
        for event in events:
            self.apply(session_id, event)

    def apply(self, session_id: str, event: EventUnion) -> list[Delta]:
        """What `event` adds to the ledger; [] for a session whose opening is unknown."""
        if isinstance(event, SessionOpened):
            self._remember(session_id, _Session(event.tenant, event.key_id, event.user_id or ""))
            return []
        session = self._sessions.get(session_id)
        if session is None:
            return []
        self._sessions.move_to_end(session_id)
        match event:
            case TurnStarted():
                turn = _Turn(
                    key_id=event.key_id or session.key_id,
                    user=event.user_id or session.user,
                    model=event.model,
                    pipeline=event.pipeline or "",
                )
                session.turns[event.turn_id] = turn
                while len(session.turns) > MAX_TURNS:
                    session.turns.popitem(last=False)
                return []
            case PipelineChosen():
                self._turn(session, event.turn_id).pipeline = event.pipeline
                return []
            case ModelCalled():
                return self._called(session, event.turn_id, event.call, event.at)
            case ReplyCompleted():
                called = self._called(session, event.turn_id, event.call, event.at)
                return [*called, self._ended(session, event.turn_id, event.at)]
            case TurnFailed() | TurnCancelled():
                return [self._ended(session, event.turn_id, event.at)]
            case _:
                return []

    def _remember(self, session_id: str, session: _Session) -> None:
        self._sessions[session_id] = session
        self._sessions.move_to_end(session_id)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)

    def _turn(self, session: _Session, turn_id: str) -> _Turn:
        turn = session.turns.get(turn_id)
        if turn is None:
            # Its start is past what is kept: bill the session's opener.
            turn = session.turns[turn_id] = _Turn(session.key_id, session.user, model="")
        return turn

    def _row(self, session: _Session, turn: _Turn, at: datetime) -> RowKey:
        return RowKey(
            day=utc_day(at),
            tenant=session.tenant,
            key_id=turn.key_id,
            user=turn.user,
            model=turn.model,
            pipeline=turn.pipeline,
            engine=turn.engine,
            upstream_model=turn.upstream_model,
        )

    def _called(
        self, session: _Session, turn_id: str, call: ModelCall | None, at: datetime
    ) -> list[Delta]:
        if call is None:
            return []  # an old reply: its call is the ModelCalled just before it
        turn = self._turn(session, turn_id)
        turn.engine, turn.upstream_model = call.engine, call.upstream_model
        usage = call.usage
        prompt = usage.prompt_tokens if usage else 0
        completion = usage.completion_tokens if usage else 0
        return [
            Delta(
                self._row(session, turn, at),
                prompt_tokens=prompt,
                completion_tokens=completion,
                cost_nusd=self._prices.cost_nusd(call, prompt, completion),
            )
        ]

    def _ended(self, session: _Session, turn_id: str, at: datetime) -> Delta:
        return Delta(self._row(session, self._turn(session, turn_id), at), requests=1)
