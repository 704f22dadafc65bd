"""Conversations changed without a turn (/v1/conversations), as the session's pure logic:
given events, when a command, then events (no event loop)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from actors import session
from actors.errors import (
    ItemNotFound,
    ResponseNotFound,
    SessionExists,
    SessionNotFound,
    TurnInProgress,
)
from contracts.conversations import (
    AddItems,
    DeleteItem,
    DeleteResponse,
    OpenConversation,
    UpdateMetadata,
)
from contracts.session import StartTurn
from eventstore.events import (
    ChatMessage,
    EventUnion,
    HistorySummarized,
    ItemDeleted,
    ItemsAdded,
    MetadataUpdated,
    ReplyCompleted,
    ResponseDeleted,
    SessionOpened,
    TurnFailed,
    TurnStarted,
    Usage,
)
from eventstore.upcast import EVENT_CODEC

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def msg(role: str, text: str) -> ChatMessage:
    return ChatMessage(role=role, content=text)


def opened(tenant: str = "t1", user: str | None = None) -> SessionOpened:
    return SessionOpened(at=T0, session_id="c1", tenant=tenant, key_id="k1", user_id=user)


def edit(command: object) -> session.Edit:
    return session.Edit(edit=command, now=T0)  # type: ignore[arg-type]


def given(*events: EventUnion) -> session.SessionState:
    return session.fold(list(events))


def add(*messages: ChatMessage, tenant: str = "t1", user: str | None = None) -> AddItems:
    return AddItems(session_id="c1", tenant=tenant, key_id="k1", user=user, messages=list(messages))


def delete(item: int, tenant: str = "t1") -> DeleteItem:
    return DeleteItem(session_id="c1", tenant=tenant, key_id="k1", item=item)


def test_open_conversation_opens_a_session_holding_its_items_and_metadata() -> None:
    command = OpenConversation(
        session_id="c1",
        tenant="t1",
        key_id="k1",
        user="u1",
        messages=[msg("user", "hi"), msg("assistant", "hello")],
        metadata={"topic": "tea"},
    )
    events = session.decide(session.initial(), edit(command))
    assert events == [
        SessionOpened(at=T0, session_id="c1", tenant="t1", key_id="k1", user_id="u1"),
        ItemsAdded(at=T0, messages=[msg("user", "hi"), msg("assistant", "hello")]),
        MetadataUpdated(at=T0, metadata={"topic": "tea"}),
    ]
    state = session.fold(events)
    assert state.history == (msg("user", "hi"), msg("assistant", "hello"))
    assert state.metadata == {"topic": "tea"} and state.turns == 0
    assert session.item_numbers(state) == [0, 1]


def test_an_empty_conversation_is_only_opened() -> None:
    command = OpenConversation(session_id="c1", tenant="t1", key_id="k1")
    assert [type(e) for e in session.decide(session.initial(), edit(command))] == [SessionOpened]


def test_open_conversation_on_an_existing_session_is_refused() -> None:
    command = OpenConversation(session_id="c1", tenant="t1", key_id="k1")
    with pytest.raises(SessionExists):
        session.decide(given(opened()), edit(command))


def test_items_join_the_history_the_next_turn_sees() -> None:
    state = given(opened(), ItemsAdded(at=T0, messages=[msg("user", "remember: 42")]))
    events = session.decide(state, edit(add(msg("assistant", "noted"))))
    assert events == [ItemsAdded(at=T0, messages=[msg("assistant", "noted")])]
    state = session.fold(events, state)
    start = StartTurn(
        command_id="x",
        turn_id="t",
        session_id="c1",
        new_session=False,
        tenant="t1",
        key_id="k1",
        model="veil",
        messages=[msg("user", "what number?")],
    )
    turn = session.OpenTurn(start=start, now=T0, lease_until=T0 + timedelta(minutes=1))
    state = session.fold(session.decide(state, turn), state)
    assert session.prompt(state) == [
        msg("user", "remember: 42"),
        msg("assistant", "noted"),
        msg("user", "what number?"),
    ]


@pytest.mark.parametrize(
    "command",
    [
        add(msg("user", "x"), tenant="t2"),
        delete(0, tenant="t2"),
        UpdateMetadata(session_id="c1", tenant="t2", key_id="k", metadata={}),
    ],
)
def test_another_tenant_changes_nothing(command: object) -> None:
    state = given(opened(), ItemsAdded(at=T0, messages=[msg("user", "x")]))
    with pytest.raises(SessionNotFound):
        session.decide(state, edit(command))


def test_a_key_pinned_to_another_user_changes_nothing() -> None:
    with pytest.raises(SessionNotFound):
        session.decide(given(opened(user="ann")), edit(add(msg("user", "x"), user="bob")))


def test_items_wait_for_a_running_turn() -> None:
    started = TurnStarted(
        at=T0,
        turn_id="t",
        command_id="c",
        model="veil",
        messages=[msg("user", "q")],
        lease_until=T0 + timedelta(minutes=1),
    )
    state = given(opened(), ItemsAdded(at=T0, messages=[msg("user", "x")]), started)
    for command in (add(msg("user", "y")), delete(0)):
        with pytest.raises(TurnInProgress):
            session.decide(state, edit(command))
    metadata = UpdateMetadata(session_id="c1", tenant="t1", key_id="k", metadata={"a": "b"})
    assert session.decide(state, edit(metadata)) == [MetadataUpdated(at=T0, metadata={"a": "b"})]


def test_a_deleted_item_leaves_the_history_and_keeps_the_numbers_of_the_others() -> None:
    three = [msg("user", "a"), msg("assistant", "b"), msg("user", "c")]
    state = given(opened(), ItemsAdded(at=T0, messages=three))
    assert session.decide(state, edit(delete(1))) == [ItemDeleted(at=T0, item=1)]
    state = session.fold([ItemDeleted(at=T0, item=1)], state)
    assert state.history == (msg("user", "a"), msg("user", "c"))
    assert session.item_numbers(state) == [0, 2]
    state = session.fold([ItemsAdded(at=T0, messages=[msg("user", "d")])], state)
    assert session.item_numbers(state) == [0, 2, 3]  # a number is never given out again
    for gone in (1, 4):
        with pytest.raises(ItemNotFound):
            session.decide(state, edit(delete(gone)))
    view = session.session_view("c1", state, messages=True)
    assert view.item_count == 4 and view.item_numbers == [0, 2, 3]


def test_deleting_a_summarized_item_keeps_the_summary_boundary() -> None:
    state = given(
        opened(),
        ItemsAdded(at=T0, messages=[msg("user", "a"), msg("assistant", "b"), msg("user", "c")]),
        HistorySummarized(at=T0, turn_id="t", summary="a and b", covers=2),
    )
    state = session.fold([ItemDeleted(at=T0, item=0)], state)
    assert state.summarized == 1 and state.history[state.summarized :] == (msg("user", "c"),)
    # Deleting an item twice (a replayed event) changes nothing more.
    again = session.fold([ItemDeleted(at=T0, item=0)], state)
    assert again.history == state.history and again.summarized == 1


def test_a_reply_after_items_gets_the_next_item_numbers() -> None:
    state = given(opened(), ItemsAdded(at=T0, messages=[msg("user", "a")]))
    state = session.fold([ItemDeleted(at=T0, item=0)], state)
    start = StartTurn(
        command_id="x",
        turn_id="t",
        session_id="c1",
        new_session=False,
        tenant="t1",
        key_id="k1",
        model="veil",
        messages=[msg("user", "q")],
    )
    turn = session.OpenTurn(start=start, now=T0, lease_until=T0 + timedelta(minutes=1))
    state = session.fold(session.decide(state, turn), state)
    reply = ReplyCompleted(
        at=T0, turn_id="t", content="r", finish_reason="stop", usage=state.usage, call=None
    )
    state = session.fold([reply], state)
    assert session.item_numbers(state) == [1, 2]


def test_the_new_events_keep_their_tags_through_the_log_codec() -> None:
    events: list[EventUnion] = [
        ItemsAdded(at=T0, messages=[msg("user", "a")]),
        ItemDeleted(at=T0, item=3),
        MetadataUpdated(at=T0, metadata={"k": "v"}),
        ResponseDeleted(at=T0, turn_id="t1"),
    ]
    for event in events:
        raw = EVENT_CODEC.encode(event)
        assert msgspec.json.decode(raw)["type"] in (
            "items.added",
            "item.deleted",
            "metadata.updated",
            "response.deleted",
        )
        assert EVENT_CODEC.decode(raw) == event


# --- responses deleted (DELETE /v1/responses/{id}) ------------------------------------------


def delete_response(turn_id: str, tenant: str = "t1", user: str | None = None) -> DeleteResponse:
    return DeleteResponse(session_id="c1", tenant=tenant, key_id="k1", user=user, turn_id=turn_id)


def ran(turn_id: str, question: str, answer: str) -> list[EventUnion]:
    started = TurnStarted(
        at=T0,
        turn_id=turn_id,
        command_id=f"cmd-{turn_id}",
        model="veil",
        messages=[msg("user", question)],
        lease_until=T0 + timedelta(minutes=1),
    )
    done = ReplyCompleted(
        at=T0, turn_id=turn_id, content=answer, finish_reason="stop", usage=Usage(), call=None
    )
    return [started, done]


def test_a_deleted_response_takes_its_turns_messages_out_of_the_history() -> None:
    state = given(
        opened(),
        ItemsAdded(at=T0, messages=[msg("user", "item")]),
        *ran("a", "qa", "ra"),
        *ran("b", "qb", "rb"),
        *ran("c", "qc", "rc"),
    )
    assert session.decide(state, edit(delete_response("b"))) == [
        ResponseDeleted(at=T0, turn_id="b")
    ]
    state = session.fold([ResponseDeleted(at=T0, turn_id="b")], state)
    assert [m.content for m in state.history] == ["item", "qa", "ra", "qc", "rc"]
    assert session.item_numbers(state) == [0, 1, 2, 5, 6]
    with pytest.raises(ResponseNotFound):  # deleting twice
        session.decide(state, edit(delete_response("b")))
    # A replayed deletion changes nothing more.
    again = session.fold([ResponseDeleted(at=T0, turn_id="b")], state)
    assert again.history == state.history and again.deleted_items == state.deleted_items


def test_a_deleted_response_with_an_item_already_deleted_takes_the_rest() -> None:
    state = given(
        opened(), *ran("a", "qa", "ra"), *ran("b", "qb", "rb"), ItemDeleted(at=T0, item=2)
    )
    state = session.fold(session.decide(state, edit(delete_response("b"))), state)
    assert [m.content for m in state.history] == ["qa", "ra"]
    assert state.deleted_items == (2, 3)


def test_a_deleted_summarized_turn_moves_the_summary_boundary() -> None:
    state = given(
        opened(),
        *ran("a", "qa", "ra"),
        *ran("b", "qb", "rb"),
        HistorySummarized(at=T0, turn_id="b", summary="qa ra", covers=2),
    )
    state = session.fold([ResponseDeleted(at=T0, turn_id="a")], state)
    assert state.summarized == 0 and [m.content for m in state.history] == ["qb", "rb"]


def test_a_failed_turn_is_a_response_that_can_be_deleted() -> None:
    started = ran("a", "qa", "ra")[0]
    failed = TurnFailed(at=T0, turn_id="a", status=502, code="upstream_error", message="x")
    state = given(opened(), started, failed)
    assert session.decide(state, edit(delete_response("a"))) == [
        ResponseDeleted(at=T0, turn_id="a")
    ]


def test_deleting_a_response_is_refused_for_unknown_turns_others_and_while_a_turn_runs() -> None:
    state = given(opened(user="ann"), *ran("a", "qa", "ra"))
    with pytest.raises(ResponseNotFound):
        session.decide(state, edit(delete_response("nope")))
    for other in (delete_response("a", tenant="t2"), delete_response("a", user="bob")):
        with pytest.raises(SessionNotFound):
            session.decide(state, edit(other))
    running = session.fold([ran("b", "qb", "rb")[0]], state)
    for turn_id in ("a", "b"):
        with pytest.raises(TurnInProgress):
            session.decide(running, edit(delete_response(turn_id)))
