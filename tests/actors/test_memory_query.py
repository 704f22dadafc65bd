"""What recall embeds of a query: without the words its scope is full of (issue 15)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest

from actors.memory.actor import MemoryActor
from actors.memory.embedder import Embedder, default_embedder
from actors.memory.index import MemoryIndex, MemoryRecord
from actors.memory.query import COMMON_LEAST, COMMON_SHARE, without_words
from actors.search.hybrid import HybridIndex, Scope
from contracts.memory import RecallRequest
from eventstore.memory import InMemoryEventStore

AT = datetime(2026, 3, 1, tzinfo=UTC)

# A transcript of two named people, as the projection keeps it: each item a pair of
# lines, each line its speaker's name first; the names are in every item.
JONAH = [
    "Have to run, bye for now!",
    "Right, back to it. Take care!",
    "Anyway, I should get going, talk soon!",
    "Okay, bedtime for me. Speak this week?",
    "Training plan says hill repeats tomorrow.",
    "I reread an old favourite, it holds up.",
    "Went for an easy 10k along the river.",
    "Mostly toast here, if I'm honest.",
    "Not bad at all, how about you?",
    "The weather has been all over the place.",
    "It's been ages since I went to the cinema.",
    "Any book recommendations? I'm stuck.",
]
MAYA = [
    "Pixel dragged me around the park for an hour.",
    "My flat gets the afternoon sun, great for painting.",
    "I burnt the rice again.",
    "Freelance life means I never know if I'm on holiday.",
    "Talk soon!",
]
CHAT = [f"Jonah: {j}\nMaya: {m}" for m in MAYA for j in JONAH]
ANSWER = (
    "Jonah: I'm thinking of moving from nursing into teaching CPR courses, the hospital"
    " offered me a trainer post.\nMaya: Good for you, you deserve it."
)
QUESTION = "What new career direction was Jonah considering?"


def record(i: int, text: str, *, user: str | None = "maya-jonah") -> MemoryRecord:
    return MemoryRecord(
        id=f"s{i // 20}:{i}",
        tenant="t",
        user_id=user,
        session_id=f"s{i // 20}",
        kind="exchange",
        role="user",
        text=text,
        source_seq=i,
        created_at=AT,
    )


def transcript(n: int) -> list[str]:
    """`n` items of the chat, the answer among them."""
    texts = CHAT[: n - 1]
    texts.insert(n // 2, ANSWER)
    return texts


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return default_embedder()


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[MemoryIndex]:
    idx = await MemoryIndex.open(tmp_path / "memory.sqlite")
    yield idx
    await idx.close()


async def store(index: MemoryIndex, texts: Sequence[str], **kw: Any) -> None:
    records = [record(i, t, **kw) for i, t in enumerate(texts)]
    await index.add(records, np.random.default_rng(1).normal(size=(len(records), index.dim)))


async def semantic(index: MemoryIndex, text: str, user: str | None = "maya-jonah") -> str:
    return await index.semantic_query(tenant="t", session_id="ask", user_id=user, query_text=text)


# -- the words left out -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words", "left"),
    [
        (QUESTION, {"jonah"}, "What new career direction was considering?"),
        ("Why did Maya's dad call?", {"maya"}, "Why did dad call?"),
        ("Why did Maya’s dad call?", {"maya"}, "Why did dad call?"),
        ("When did MAYA and Jonah meet?", {"maya", "jonah"}, "When did and meet?"),
        ("Where is Zoë now?", {"zoe"}, "Where is now?"),  # folded as FTS5 folds
        ("Maya's plans, Jonah's too", {"maya", "jonah"}, "plans, too"),
        ("Mayan ruins near Maya's flat", {"maya"}, "Mayan ruins near flat"),  # whole words only
        ("Maya?", {"maya"}, "Maya?"),  # nothing else: the query as asked
        ("Maya Jonah", {"maya", "jonah"}, "Maya Jonah"),
        (QUESTION, set(), QUESTION),
    ],
)
def test_without_words(text: str, words: set[str], left: str) -> None:
    assert without_words(text, words) == left


# -- which words: half the scope or more --------------------------------------


async def test_a_name_in_every_item_leaves_the_query(index: MemoryIndex) -> None:
    await store(index, transcript(60))
    assert await semantic(index, QUESTION) == "What new career direction was considering?"
    # "maya" is in every item too; "hospital" in one.
    assert await semantic(index, "Did Maya visit the hospital?") == "Did visit the hospital?"
    # Another user's scope, or a search that names no user, sees none of these items.
    assert await semantic(index, QUESTION, user="someone-else") == QUESTION
    assert await semantic(index, QUESTION, user=None) == QUESTION


async def test_a_word_in_fewer_than_half_the_items_stays(index: MemoryIndex) -> None:
    texts = [f"Note {i}: nothing much today." for i in range(60)]
    share = int(60 * COMMON_SHARE)
    for i in range(share - 1):  # one short of half
        texts[i] = f"Note {i}: walked the dog by the canal."
    await store(index, texts)
    assert await semantic(index, "Where did I walk the dog?") == "Where did I walk the dog?"
    await index.add(
        [record(100, "Note 100: walked the dog by the canal.")],
        np.random.default_rng(2).normal(size=(1, index.dim)),
    )
    # Now "dog" is in 30 of 61: not yet half. "today" is in 31 of 61.
    assert await semantic(index, "Where did I walk the dog?") == "Where did I walk the dog?"
    assert await semantic(index, "what about today's dog?") == "what about dog?"


async def test_a_small_scope_keeps_the_whole_query(index: MemoryIndex) -> None:
    # Every item names Jonah, but too few items for a share to say anything.
    await store(index, transcript(COMMON_LEAST - 1))
    assert await semantic(index, QUESTION) == QUESTION
    await index.add([record(500, CHAT[0])], np.random.default_rng(3).normal(size=(1, index.dim)))
    assert await semantic(index, QUESTION) != QUESTION


async def test_the_session_and_the_user_scope_count_together(tmp_path: Path) -> None:
    hybrid = await HybridIndex.open(tmp_path / "h.sqlite")
    try:
        from actors.search.entries import Entry

        def entry(scope: Scope, i: int, text: str) -> Entry:
            return Entry(
                scope=scope,
                id=str(i),
                kind="m",
                role="user",
                text=text,
                source=None,
                source_seq=i,
                created_at=AT,
            )

        user, session = Scope("u", "t", "u1"), Scope("s", "t", "s1")
        entries = [entry(user, i, "kiwi fruit" if i < 30 else "plain") for i in range(40)]
        entries += [entry(session, i, "plain") for i in range(40)]
        await hybrid.add(entries, np.random.default_rng(4).normal(size=(80, hybrid.dim)))
        # 30 of the user's 40: common there, but 30 of the two scopes' 80 is not half.
        assert await hybrid.common_terms([user], "kiwi?", share=0.5, least=10) == {"kiwi"}
        assert await hybrid.common_terms([user, session], "kiwi?", share=0.5, least=10) == set()
        assert await hybrid.common_terms([user, session], "plain", share=0.5, least=10) == {"plain"}
        # Stop words are never counted; a scope not stored counts nothing.
        assert await hybrid.common_terms([user], "the kiwi", share=0.1, least=1) == {"kiwi"}
        assert (
            await hybrid.common_terms([Scope("u", "t", "nobody")], "kiwi", share=0, least=1)
            == set()
        )
    finally:
        await hybrid.close()


# -- what recall embeds -------------------------------------------------------


class Recording:
    """The real embedder, recording what it is asked to embed."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.asked: list[str] = []

    async def aembed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.asked.extend(texts)
        return await self.inner.aembed(list(texts))


async def test_recall_embeds_the_query_without_the_speakers_and_finds_the_answer(
    index: MemoryIndex, embedder: Embedder
) -> None:
    texts = transcript(60)
    records = [record(i, t) for i, t in enumerate(texts)]
    await index.add(records, await embedder.aembed(texts))
    answer = records[texts.index(ANSWER)].id
    recording = Recording(embedder)
    actor = MemoryActor(
        cast(Any, None),
        cast(Any, None),
        index,
        cast(Embedder, recording),
        store=InMemoryEventStore(),
        tombstones=cast(Any, None),
        version="test",
    )
    for mode in ("hybrid", "vector"):
        ask = RecallRequest(
            tenant="t", session_id="ask", user_id="maya-jonah", query=QUESTION, mode=mode, k=10
        )
        hits = await actor.recall(ask)
        assert recording.asked[-1] == "What new career direction was considering?"
        assert hits[0].id == answer, mode
    # Embedded whole, the name pulls the question to the speakers' goodbyes instead.
    whole = await index.vector_search(
        tenant="t",
        session_id="ask",
        user_id="maya-jonah",
        query_vector=(await embedder.aembed([QUESTION]))[0],
        k=3,
    )
    assert answer not in [h.id for h in whole]
    # Keyword recall reads the query as asked and embeds nothing.
    asked = len(recording.asked)
    await actor.recall(
        RecallRequest(
            tenant="t", session_id="ask", user_id="maya-jonah", query=QUESTION, mode="keyword"
        )
    )
    assert len(recording.asked) == asked
