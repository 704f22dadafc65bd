"""What a memory item carries and how memory fuses its two sides (issue 15)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest

from actors.memory import index as memory_index
from actors.memory import projector as projector_module
from actors.memory.embedder import Embedder
from actors.memory.index import MemoryIndex
from actors.memory.items import ITEM_TOKENS, exchange, item_text, parts
from actors.memory.projector import Projector, records_of
from actors.memory.prompting import choose_memories, prompt_texts
from actors.search import _ranking as ranking
from actors.tokens import estimate_tokens
from bus.subjects import session_events
from config import MemoryPolicy
from contracts.memory import MemoryHit
from eventstore.events import (
    ChatMessage,
    EventUnion,
    FactsExtracted,
    ReplyCompleted,
    SessionOpened,
    TurnCancelled,
    TurnFailed,
    TurnStarted,
    Usage,
)
from eventstore.memory import InMemoryEventStore
from eventstore.store import EventStore
from eventstore.upcast import EVENT_CODEC

AT = datetime(2026, 3, 1, tzinfo=UTC)


def _turn(*messages: ChatMessage, turn_id: str = "t1") -> TurnStarted:
    return TurnStarted(
        at=AT,
        turn_id=turn_id,
        command_id="c1",
        model="veil",
        messages=list(messages),
        lease_until=AT + timedelta(seconds=60),
    )


def _reply(content: str, turn_id: str = "t1") -> ReplyCompleted:
    return ReplyCompleted(
        at=AT + timedelta(seconds=5),
        turn_id=turn_id,
        content=content,
        finish_reason="stop",
        usage=Usage(),
        call=None,
    )


def test_a_turn_is_one_item_when_its_reply_completes() -> None:
    started = _turn(
        ChatMessage(role="user", name="Maya", content="I signed the lease in Porto."),
        ChatMessage(role="user", name="Jonah", content="Wow, tell me more!"),
        ChatMessage(role="user", content="No name here."),
        ChatMessage(role="tool", content="not remembered", tool_call_id="c1"),
    )
    assert records_of("s1", 7, started, ("acme", "u1")) == []
    [item] = records_of("s1", 9, _reply("Congratulations!"), ("acme", "u1"), started)
    assert item.text == (
        "Maya: I signed the lease in Porto.\nJonah: Wow, tell me more!\nNo name here.\n"
        "Assistant: Congratulations!"
    )
    # Its id is the position of the event that ended the turn; it was said when the turn began.
    assert (item.id, item.source_seq, item.kind, item.role) == ("s1:9", 9, "exchange", "user")
    assert (item.tenant, item.user_id, item.session_id, item.created_at) == (
        "acme",
        "u1",
        "s1",
        AT,
    )


def test_a_blank_name_adds_nothing() -> None:
    started = _turn(ChatMessage(role="user", name="  ", content="hello"))
    assert [r.text for r in records_of("s1", 2, _reply(""), ("acme", None), started)] == ["hello"]


def test_a_failed_or_cancelled_turn_keeps_its_messages_alone() -> None:
    started = _turn(ChatMessage(role="user", content="My safe's code is 7741."))
    failed = TurnFailed(at=AT, turn_id="t1", status=502, code="upstream", message="down")
    cancelled = TurnCancelled(at=AT, turn_id="t1", content="Half an ans")
    for end in (failed, cancelled):
        records = records_of("s1", 4, end, ("acme", None), started)
        assert [(r.id, r.text) for r in records] == [("s1:4", "My safe's code is 7741.")]


def test_a_long_turn_is_cut_into_bounded_parts() -> None:
    words = " ".join(f"word{i}" for i in range(2000))
    started = _turn(ChatMessage(role="user", content="Summarise this: " + words))
    blob = "x" * 5000  # no space to cut at
    records = records_of("s1", 9, _reply(blob), ("acme", None), started)
    assert len(records) > 10
    assert all(estimate_tokens(r.text) <= ITEM_TOKENS for r in records)
    assert [r.id for r in records[:3]] == ["s1:9", "s1:9:p1", "s1:9:p2"]
    assert len({r.id for r in records}) == len(records)
    # Nothing is lost: the parts, in order, are the whole turn.
    assert "".join(r.text for r in records).replace(" ", "").replace("\n", "") == (
        exchange(started.messages, blob).replace(" ", "").replace("\n", "")
    )
    # Ten items stay under the 1,500 tokens issue 15 allows.
    assert 10 * ITEM_TOKENS <= 1500


def test_parts_cut_at_a_space_in_the_second_half() -> None:
    assert parts("aaa bbb ccc", limit=8) == ["aaa bbb", "ccc"]
    assert parts("  short  ", limit=8) == ["short"]
    assert parts("abcdefghij", limit=4) == ["abcd", "efgh", "ij"]
    assert parts("", limit=4) == []


def test_the_audit_resolves_a_reference_to_the_whole_turn() -> None:
    started = _turn(ChatMessage(role="user", content="My codename is heron."))
    log = {3: started, 5: _reply("Noted."), 6: FactsExtracted(at=AT, turn_id="t1", facts=["a"])}
    assert item_text(log, 5) == "My codename is heron.\nAssistant: Noted."
    assert item_text(log, 6) == "a"
    assert item_text(log, 3) == "My codename is heron."  # an index made before exchanges
    assert item_text(log, 99) is None


def test_recall_leaves_out_a_turn_the_prompt_already_carries() -> None:
    started = _turn(ChatMessage(role="user", content="My badge number is 4411."))
    [item] = records_of("s1", 5, _reply("Noted."), ("acme", "u1"), started)
    prompt = [
        ChatMessage(role="system", content="Be brief."),
        *started.messages,
        ChatMessage(role="assistant", content="Noted."),
        ChatMessage(role="user", content="What is my badge number?"),
    ]
    in_prompt = prompt_texts(prompt)
    assert item.text in in_prompt
    hit = MemoryHit(
        id=item.id,
        session_id="s1",
        user_id="u1",
        kind=item.kind,
        role=item.role,
        text=item.text,
        source_seq=5,
        created_at=AT,
        score=1.0,
        vector_rank=1,
        vector_similarity=0.9,
        keyword_rank=1,
        bm25=3.0,
    )
    assert choose_memories([hit], in_prompt, MemoryPolicy()) == []
    assert choose_memories([hit], prompt_texts(prompt[3:]), MemoryPolicy()) == [hit]


def test_fuse_weighs_the_keyword_side_as_asked() -> None:
    # Item 1 is the vector side's first, item 2 the keyword side's first and the vector
    # side's 10th: at weight 1 item 2 wins, at weight 0.1 item 1 does.
    vec = [(1, 0.9), *[(100 + i, 0.5) for i in range(8)], (2, 0.3)]
    kw = [(2, 4.0)]
    assert ranking.fuse(vec, kw, 1, keyword_weight=1.0)[0] == [2]
    assert ranking.fuse(vec, kw, 1, keyword_weight=0.1)[0] == [1]


async def test_memory_fuses_as_measured_with_turn_items(tmp_path: Path) -> None:
    """Memory's search asks the index for the fusion measured with a turn as one item."""
    index = await MemoryIndex.open(tmp_path / "m.db")
    seen: dict[str, Any] = {}

    async def spy(*args: Any, **kwargs: Any) -> list[Any]:
        seen.update(kwargs)
        return []

    try:
        index.store.search = spy  # type: ignore[method-assign]
        await index.search(
            tenant="acme",
            session_id="s1",
            user_id=None,
            query_vector=np.ones(384, np.float32),
            query_text="porto",
        )
    finally:
        await index.close()
    assert seen["keyword_weight"] == memory_index.KEYWORD_WEIGHT == 0.5
    assert seen["head"] == memory_index.FUSED_HEAD == 20


@pytest.mark.parametrize("weight", [0.5, 1.0])
def test_knowledge_keeps_its_fusion(weight: float) -> None:
    """The shared index's defaults stay what the knowledge base was tuned with."""
    assert ranking.KEYWORD_WEIGHT == 0.5
    assert ranking.FUSED_HEAD == 10
    assert ranking.fuse([(1, 0.9)], [(1, 1.0)], 1, keyword_weight=weight)[0] == [1]


class HashEmbedder:
    """A vector from each text's digest: the same text, the same vector, on every run."""

    dim = 384
    model_id = "hash"

    async def aembed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        rows = [
            np.random.default_rng(int.from_bytes(hashlib.sha256(t.encode()).digest()[:8]))
            .standard_normal(self.dim)
            .astype(np.float32)
            for t in texts
        ]
        return np.array(rows, np.float32).reshape(len(texts), self.dim)


async def _logged(store: InMemoryEventStore) -> list[tuple[str, int, bytes]]:
    """Two sessions of one user, with turns ending after other sessions' events."""
    opened = [
        SessionOpened(at=AT, session_id=sid, tenant="acme", key_id="k", user_id="u1")
        for sid in ("s1", "s2")
    ]
    for event in opened:
        await store.append("acme", event.session_id, [event], expected_last_seq=0)
    steps = [
        ("s1", _turn(ChatMessage(role="user", content="My cat is called Pixel."))),
        ("s2", _turn(ChatMessage(role="user", content="I moved to Lisbon."), turn_id="t2")),
        ("s1", _reply("Nice name!")),
        ("s2", _reply("Welcome!", turn_id="t2")),
    ]
    for sid, event in steps:
        await store.append(
            "acme", sid, [event], expected_last_seq=await store.last_seq("acme", sid)
        )
    batch = [
        (session_events("acme", sid), stored.seq, EVENT_CODEC.encode(stored.event))
        for sid in ("s1", "s2")
        for stored in await store.load("acme", sid)
    ]
    return sorted(batch, key=lambda item: item[1])


async def _projected(
    path: Path, store: InMemoryEventStore, batches: list[list[tuple[str, int, bytes]]]
) -> list[Any]:
    """The index rows after these batches, a new projector for each (a restart between)."""
    index = await MemoryIndex.open(path)
    try:
        for batch in batches:
            projector = Projector(index, cast(Embedder, HashEmbedder()), cast(EventStore, store))
            await projector.apply(batch)
        return await index.dump()
    finally:
        await index.close()


async def test_a_restart_mid_turn_builds_what_one_pass_builds(tmp_path: Path) -> None:
    """The live projection restarted between a turn's start and its end reads the start from
    the log, so it builds exactly what a rebuild (`veil reindex`) builds in one pass."""
    store = InMemoryEventStore()
    log = await _logged(store)
    once = await _projected(tmp_path / "once.db", store, [log])
    assert sorted(row[6] for row in once) == [
        "I moved to Lisbon.\nAssistant: Welcome!",
        "My cat is called Pixel.\nAssistant: Nice name!",
    ]
    for cut in range(1, len(log)):
        split = await _projected(tmp_path / f"cut{cut}.db", store, [log[:cut], log[cut:]])
        assert split == once, cut
    # Replayed again on top (redelivery): nothing changes.
    assert await _projected(tmp_path / "once.db", store, [log]) == once


async def test_deleting_a_session_removes_its_turns_and_keeps_them_out(tmp_path: Path) -> None:
    store = InMemoryEventStore()
    log = await _logged(store)
    index = await MemoryIndex.open(tmp_path / "m.db")
    projector = Projector(index, cast(Embedder, HashEmbedder()), cast(EventStore, store))
    try:
        # s1's turn started; s2's whole turn is indexed; then s2 and s1 are deleted.
        await projector.apply(log[:5])
        assert [row[3] for row in await index.dump()] == ["s1"]
        for sid in ("s1", "s2"):
            projector.forget("acme", sid)
            await index.delete_session("acme", sid)
        await projector.apply(log[5:])
        await projector.apply(log)  # a rebuild from the log
        assert await index.count() == 0
        hits = await index.keyword_search(
            tenant="acme", session_id="s3", user_id="u1", query_text="Pixel Lisbon"
        )
        assert hits == []
    finally:
        await index.close()


async def test_the_projector_keeps_the_owners_of_recent_sessions_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every session ever seen once stayed in the projector: the memory process grew for
    as long as it ran. Past the bound, a session's owner is read again from its log."""
    monkeypatch.setattr(projector_module, "MAX_OWNERS", 3)
    store = InMemoryEventStore()
    sids = [f"s{i}" for i in range(6)]
    for sid in sids:
        opened = SessionOpened(at=AT, session_id=sid, tenant="acme", key_id="k", user_id=sid)
        await store.append("acme", sid, [opened], expected_last_seq=0)

    async def logged(sid: str, *events: EventUnion) -> list[tuple[str, int, bytes]]:
        out = []
        for event in events:
            last = await store.append(
                "acme", sid, [event], expected_last_seq=await store.last_seq("acme", sid)
            )
            out.append((session_events("acme", sid), last, EVENT_CODEC.encode(event)))
        return out

    index = await MemoryIndex.open(tmp_path / "m.db")
    projector = Projector(index, cast(Embedder, HashEmbedder()), cast(EventStore, store))
    try:
        opened = [
            (session_events("acme", sid), s.seq, EVENT_CODEC.encode(s.event))
            for sid in sids
            for s in await store.load("acme", sid)
        ]
        await projector.apply(opened)
        assert len(projector._owners) == 3
        # s0's owner is long gone from the cache: its turn is still indexed as its user's.
        turn = _turn(ChatMessage(role="user", content="My cat is called Pixel."))
        await projector.apply(await logged("s0", turn, _reply("Nice name!")))
        assert len(projector._owners) == 3
        hits = await index.keyword_search(
            tenant="acme", session_id="s0", user_id="s0", query_text="Pixel"
        )
        assert [h.session_id for h in hits] == ["s0"]
    finally:
        await index.close()
