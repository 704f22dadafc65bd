"""The memory index on real SQLite files, with the real embedding model."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import sys
import textwrap
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pysqlite3.dbapi2 as sqlite  # type: ignore[import-untyped]
import pytest
import sqlite_vec  # type: ignore[import-untyped]

from actors.memory.embedder import Embedder, default_embedder
from actors.memory.index import MemoryIndex, MemoryRecord, quantize
from actors.search import hybrid

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

DISTRACTORS = [
    "Can you suggest a good recipe for banana bread?",
    "The weather in Oslo has been grey all week.",
    "I need to renew my passport before the summer.",
    "What is the difference between a list and a tuple in Python?",
    "My flight to Madrid leaves at seven in the morning.",
    "Please summarise the meeting notes from Tuesday.",
    "The car needs new tyres before winter.",
    "How many calories are in a bowl of porridge?",
    "I started running three times a week.",
    "Our team moved the release to next Thursday.",
    "Recommend a podcast about ancient history.",
    "The printer on the second floor is jammed again.",
    "I am thinking of painting the kitchen green.",
    "What time does the pharmacy close on Sundays?",
    "My phone battery drains too quickly.",
    "Write a haiku about autumn leaves.",
    "The quarterly report is due at the end of the month.",
    "We adopted a cat from the shelter last year.",
    "How do I convert Celsius to Fahrenheit?",
    "I lost my keys somewhere in the park.",
    "Explain how a mortgage amortisation schedule works.",
    "The neighbours are renovating their bathroom.",
    "Which plants survive in a shady balcony?",
    "Can you translate 'good morning' into Italian?",
    "The library book is two weeks overdue.",
    "I want to learn to play the ukulele.",
    "Our internet went down during the video call.",
    "Is it safe to eat eggs after the best-before date?",
    "I booked a dentist appointment for Friday.",
    "The bakery on the corner sells great croissants.",
    "What are the rules of cricket in simple terms?",
    "My brother is getting married in September.",
    "Help me write a cover letter for a data analyst job.",
    "The gym is closed for maintenance tomorrow.",
    "How long should I boil a soft egg?",
    "We are planning a road trip along the coast.",
    "My laptop fan makes a loud noise.",
    "Suggest names for a golden retriever puppy.",
    "I prefer tea to coffee in the afternoon.",
    "The bus was twenty minutes late this morning.",
    "What is a good stretching routine for back pain?",
    "Remind me to call the bank about the fee.",
    "My garden tomatoes are finally turning red.",
    "I watched a documentary about deep sea creatures.",
    "Which board games are fun for four players?",
    "The concert tickets sold out in an hour.",
    "How do I remove a red wine stain from a carpet?",
    "I am reading a novel set in Victorian London.",
    "Our office switched to a four-day week.",
    "What should I pack for a week of hiking?",
    "I keep forgetting to water the orchid.",
    "The train strike affects services on Monday.",
    "Give me ideas for a vegetarian dinner party.",
    "My grandmother turns ninety next month.",
    "The dishwasher leaves spots on the glasses.",
]


def rec(
    i: int,
    text: str,
    *,
    tenant: str = "t1",
    session: str = "s1",
    user: str | None = None,
    kind: str = "message",
    role: str = "user",
    rid: str | None = None,
) -> MemoryRecord:
    return MemoryRecord(
        id=rid or f"{session}:{i}",
        tenant=tenant,
        user_id=user,
        session_id=session,
        kind=kind,
        role=role,
        text=text,
        source_seq=i,
        created_at=T0 + timedelta(seconds=i),
    )


def file_bytes(path: Path) -> bytes:
    """The database file, its WAL and its shared-memory index, as they are on disk."""
    files = (path, Path(f"{path}-wal"), Path(f"{path}-shm"))
    return b"".join(p.read_bytes() for p in files if p.exists())


def vec_rows(path: Path) -> dict[str, int]:
    conn = sqlite.connect(path)
    conn.enable_load_extension(True)
    sqlite_vec.load(conn)
    try:
        return {
            t: conn.execute(f"SELECT count(*) FROM memory_vec_{t}").fetchone()[0]
            for t in ("small", "large")
        }
    finally:
        conn.close()


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return default_embedder()


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[MemoryIndex]:
    idx = await MemoryIndex.open(tmp_path / "memory.sqlite")
    yield idx
    await idx.close()


async def add_texts(
    index: MemoryIndex,
    embedder: Embedder,
    records: list[MemoryRecord],
    checkpoint: int | None = None,
) -> None:
    await index.add(
        records, await embedder.aembed([r.text for r in records]), checkpoint=checkpoint
    )


async def ask(
    index: MemoryIndex,
    embedder: Embedder,
    text: str,
    *,
    tenant: str = "t1",
    session: str = "s1",
    user: str | None = None,
    k: int = 10,
) -> list[str]:
    hits = await index.search(
        tenant=tenant,
        session_id=session,
        user_id=user,
        query_vector=embedder.embed([text])[0],
        query_text=text,
        k=k,
    )
    return [h.id for h in hits]


# -- the embedder ---------------------------------------------------------


async def test_embedder_gives_unit_vectors_that_rank_paraphrases_first(embedder: Embedder) -> None:
    texts = [
        "My sister lives in Lisbon.",
        "Where does my sister live?",
        "The stock market fell sharply today.",
        "I adore cats.",
        "Felines are my favourite pets.",
    ]
    v = await embedder.aembed(texts)
    assert v.shape == (5, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sims = v @ v.T
    assert sims[0, 1] > 0.5 > sims[0, 2] + 0.3
    assert sims[3, 4] > sims[3, 2] + 0.4
    # Batch composition does not change a text's vector (a rebuild equals the live build).
    # A trailing space gives the same tokens under another key of the recent-vectors cache,
    # so the text really runs again, padded among longer ones.
    alone = embedder.embed([f"{texts[2]} "])[0]
    padded = embedder.embed([f"{texts[2]}  ", "a much longer sentence " * 8, texts[4] + " x"])[0]
    assert np.array_equal(alone, v[2]) and np.array_equal(padded, v[2])
    long = embedder.embed(["word " * 5000])
    assert long.shape == (1, 384)


async def test_aembed_runs_on_one_worker_thread_off_the_loop(embedder: Embedder) -> None:
    seen: set[str] = set()
    original = embedder.embed

    def spy(texts: Sequence[str]) -> npt.NDArray[np.float32]:
        seen.add(threading.current_thread().name)
        return original(texts)

    embedder.embed = spy  # type: ignore[method-assign]
    try:
        await asyncio.gather(*(embedder.aembed([f"text {i}"]) for i in range(6)))
    finally:
        del embedder.embed
    assert len(seen) == 1 and threading.main_thread().name not in seen


# -- recall ---------------------------------------------------------------


async def test_hybrid_recall_finds_a_fact_among_distractors(
    index: MemoryIndex, embedder: Embedder
) -> None:
    records = [rec(i, t, role="user" if i % 2 else "assistant") for i, t in enumerate(DISTRACTORS)]
    records.insert(23, rec(900, "By the way, my daughter's violin teacher is Mrs Okonkwo."))
    await add_texts(index, embedder, records)
    query = "Who teaches my daughter the violin?"
    hits = await index.search(
        tenant="t1",
        session_id="s1",
        user_id=None,
        query_vector=embedder.embed([query])[0],
        query_text=query,
        k=5,
    )
    assert hits[0].id == "s1:900"
    assert hits[0].vector_rank == 1 and hits[0].keyword_rank == 1
    assert hits[0].vector_similarity is not None and hits[0].vector_similarity > 0.4
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # A paraphrase that shares no word with the fact still finds it through the vectors.
    assert (await ask(index, embedder, "name of the person giving music lessons to my child", k=3))[
        0
    ] == "s1:900"


async def test_keyword_search_finds_an_exact_rare_word(
    index: MemoryIndex, embedder: Embedder
) -> None:
    records = [rec(i, t) for i, t in enumerate(DISTRACTORS)]
    records.append(rec(500, "The supplier's reference for the broken pump is ZX-48213-Q."))
    await add_texts(index, embedder, records)
    hits = await index.keyword_search(
        tenant="t1", session_id="s1", user_id=None, query_text="what was ZX-48213-Q about?", k=3
    )
    assert [h.id for h in hits] == ["s1:500"]
    assert hits[0].bm25 is not None and hits[0].keyword_rank == 1 and hits[0].vector_rank is None
    assert (await ask(index, embedder, "ZX-48213-Q"))[0] == "s1:500"


async def test_scope_covers_the_session_and_the_user_and_nothing_else(
    index: MemoryIndex, embedder: Embedder
) -> None:
    text = "I love pineapple on pizza."
    stored = [
        rec(1, text, session="s1", rid="A"),  # this session, no user
        rec(2, text, session="s1", user="u1", rid="B"),  # this session, this user
        rec(3, text, session="s4", user="u1", rid="C"),  # same user, other session
        rec(4, text, session="s2", rid="D"),  # same tenant, other session
        rec(5, text, session="s3", user="u2", rid="E"),  # same tenant, other user
        rec(6, text, session="s1", user="u2", rid="F"),  # other user in this session
        rec(7, text, tenant="t2", session="s1", user="u1", rid="A"),  # other tenant, same ids
        rec(8, text, tenant="t2", session="s1", rid="B"),
    ]
    await add_texts(index, embedder, stored)
    assert await index.count() == 8
    qv = embedder.embed(["pineapple pizza"])[0]

    async def every_way(tenant: str, session: str, user: str | None) -> set[str]:
        found: list[set[str]] = [
            {
                f"{h.id}{h.source_seq}"
                for h in await index.search(
                    tenant=tenant,
                    session_id=session,
                    user_id=user,
                    query_vector=qv,
                    query_text="pineapple",
                    k=50,
                )
            },
            {
                f"{h.id}{h.source_seq}"
                for h in await index.vector_search(
                    tenant=tenant, session_id=session, user_id=user, query_vector=qv, k=50
                )
            },
            {
                f"{h.id}{h.source_seq}"
                for h in await index.keyword_search(
                    tenant=tenant, session_id=session, user_id=user, query_text="pineapple", k=50
                )
            },
        ]
        assert found[0] == found[1] == found[2]
        return found[0]

    # Ids carry their source_seq here, so tenant t2's "A" (7) is told from t1's "A" (1).
    assert await every_way("t1", "s1", "u1") == {"A1", "B2", "C3"}
    assert await every_way("t1", "s1", None) == {"A1"}  # a user's memories need the user
    assert await every_way("t1", "s2", None) == {"D4"}
    assert await every_way("t1", "s9", "u2") == {"E5", "F6"}
    assert await every_way("t2", "s1", "u1") == {"A7", "B8"}
    assert await every_way("t2", "s1", None) == {"B8"}
    assert await every_way("t3", "s1", "u1") == set()


@pytest.mark.parametrize(
    "query",
    [
        '"',
        'a"b',
        "foo:bar",
        "(",
        ")",
        "AND",
        "OR NOT",
        "NOT",
        "*",
        "-",
        "pine*",
        "NEAR(a b)",
        "^start",
        "{text}: x",
        "text:pineapple",
        "'; DROP TABLE memories; --",
        "",
        "   ",
        "💥🍍",
        "ünïcödé façade",
        '"unterminated pineapple',
        "x -y +z",
        "a AND (b OR",
        "\x00\x01",
        "a" * 5000,
        "AND OR NOT NEAR",
        "pineapple:",
        "[pineapple]",
        "@#$%^&*",
        "rowid",
        "memory_fts",
    ],
)
async def test_query_text_never_raises(index: MemoryIndex, embedder: Embedder, query: str) -> None:
    await add_texts(
        index, embedder, [rec(1, "I love pineapple on pizza."), rec(2, "Façade repairs.")]
    )
    qv = embedder.embed(["pizza"])[0]
    hits = await index.search(
        tenant="t1", session_id="s1", user_id=None, query_vector=qv, query_text=query
    )
    assert {h.id for h in hits} == {"s1:1", "s1:2"}
    words = await index.keyword_search(tenant="t1", session_id="s1", user_id=None, query_text=query)
    if "pineapple" in query:
        assert [h.id for h in words] == ["s1:1"]
    if "façade" in query:
        assert "s1:2" in [h.id for h in words]


async def test_kind_filter(index: MemoryIndex, embedder: Embedder) -> None:
    records = [rec(i, t) for i, t in enumerate(DISTRACTORS[:20])]
    records.append(rec(100, "The user is allergic to peanuts.", kind="fact", role="system"))
    await add_texts(index, embedder, records)
    hits = await index.search(
        tenant="t1",
        session_id="s1",
        user_id=None,
        query_vector=embedder.embed(["food"])[0],
        query_text="food",
        kinds={"fact"},
    )
    assert [h.id for h in hits] == ["s1:100"]


async def test_vec0_finds_a_scope_by_index_not_by_scanning_every_chunk(
    index: MemoryIndex, tmp_path: Path
) -> None:
    await index.add([rec(1, "hello")], np.ones((1, 384)))
    conn = sqlite.connect(tmp_path / "memory.sqlite")
    try:
        for table in ("memory_vec_small", "memory_vec_large"):
            # The statement vec0 0.1.9 runs to list a partition's chunks on every KNN.
            plan = conn.execute(
                "EXPLAIN QUERY PLAN SELECT chunk_id, validity, rowids"
                f" FROM {table}_chunks WHERE partition00 = ?",
                (1,),
            ).fetchall()
            assert "USING INDEX" in str(plan), plan
    finally:
        conn.close()


async def test_quantisation_matches_sqlite_vec() -> None:
    v = np.random.default_rng(1).standard_normal((3, 384)).astype(np.float32)
    conn = sqlite.connect(":memory:")
    conn.enable_load_extension(True)
    sqlite_vec.load(conn)
    for row, bits in zip(v, quantize(v), strict=True):
        theirs = conn.execute("SELECT vec_quantize_binary(?)", (row.tobytes(),)).fetchone()[0]
        assert bytes(theirs) == bits.tobytes()


# -- writing, checkpoints, rebuilds ----------------------------------------


async def test_add_is_idempotent(index: MemoryIndex, embedder: Embedder) -> None:
    records = [rec(i, t) for i, t in enumerate(DISTRACTORS[:12])]
    await add_texts(index, embedder, records[:8])
    before = await index.dump()
    await add_texts(index, embedder, records[:8])
    assert await index.dump() == before
    await add_texts(index, embedder, records[4:] + records[10:])  # overlap and in-batch repeat
    assert await index.count() == 12
    await index.verify()
    assert (
        len(
            await index.keyword_search(
                tenant="t1", session_id="s1", user_id=None, query_text="banana bread", k=50
            )
        )
        == 1
    )


async def test_checkpoint_round_trip(tmp_path: Path, embedder: Embedder) -> None:
    path = tmp_path / "memory.sqlite"
    idx = await MemoryIndex.open(path)
    assert await idx.checkpoint() == 0
    await add_texts(idx, embedder, [rec(1, "hello there")], checkpoint=5)
    await idx.close()
    idx = await MemoryIndex.open(path)
    try:
        assert await idx.checkpoint() == 5
        await add_texts(idx, embedder, [rec(1, "hello there")], checkpoint=3)  # a redelivery
        assert await idx.checkpoint() == 5
        await idx.add([], np.zeros((0, 384), np.float32), checkpoint=9)  # events with no memory
        assert await idx.checkpoint() == 9
        assert await idx.count() == 1
    finally:
        await idx.close()


async def test_an_index_made_by_another_model_empties_itself_for_a_rebuild(
    tmp_path: Path, embedder: Embedder
) -> None:
    path = tmp_path / "memory.sqlite"
    idx = await MemoryIndex.open(path, model="model-a")
    await add_texts(idx, embedder, [rec(1, "hello there")], checkpoint=7)
    await idx.close()
    idx = await MemoryIndex.open(path, model="model-a")
    assert not idx.model_changed and await idx.count() == 1 and await idx.checkpoint() == 7
    await idx.close()
    idx = await MemoryIndex.open(path, model="model-b")
    try:
        assert idx.model_changed and await idx.count() == 0 and await idx.checkpoint() == 0
        await add_texts(idx, embedder, [rec(2, "rebuilt")], checkpoint=2)
        await idx.reset()  # `veil reindex`: the model stays recorded
    finally:
        await idx.close()
    idx = await MemoryIndex.open(path, model="model-b")
    try:
        assert not idx.model_changed
    finally:
        await idx.close()
    assert b"hello there" not in file_bytes(path)


async def test_an_index_from_before_model_ids_is_rebuilt_unless_empty(
    tmp_path: Path, embedder: Embedder
) -> None:
    old, empty = tmp_path / "old.sqlite", tmp_path / "empty.sqlite"
    idx = await MemoryIndex.open(old)
    await add_texts(idx, embedder, [rec(1, "hello there")], checkpoint=1)
    await idx.close()
    await (await MemoryIndex.open(empty)).close()
    for path, changed in ((old, True), (empty, False)):
        idx = await MemoryIndex.open(path, model=embedder.model_id)
        try:
            assert idx.model_changed is changed and await idx.count() == 0
        finally:
            await idx.close()


async def test_a_failed_add_stores_neither_rows_nor_position(
    index: MemoryIndex, embedder: Embedder
) -> None:
    await add_texts(index, embedder, [rec(0, "first")], checkpoint=1)
    bad = [rec(1, "second"), rec(2, "third"), rec(3, None)]  # type: ignore[arg-type]
    with pytest.raises(sqlite.IntegrityError):
        await index.add(bad, embedder.embed(["a", "b", "c"]), checkpoint=4)
    assert await index.checkpoint() == 1
    assert await index.count() == 1
    await index.verify()
    await add_texts(index, embedder, bad[:2], checkpoint=3)
    assert (await index.count(), await index.checkpoint()) == (3, 3)


CRASHER = """
import asyncio, sys
import numpy as np
from datetime import datetime, UTC
from actors.memory.index import MemoryIndex, MemoryRecord

async def main():
    idx = await MemoryIndex.open(sys.argv[1])
    rng = np.random.default_rng(0)
    for batch in range(1, 100000):
        recs = [MemoryRecord(id=f"s:{batch}:{i}", tenant="t", user_id=None, session_id="s",
                             kind="message", role="user", text=f"batch {batch} line {i}",
                             source_seq=batch, created_at=datetime.now(UTC)) for i in range(10)]
        await idx.add(recs, rng.standard_normal((10, 384)), checkpoint=batch)
        if batch == 3:
            print("ready", flush=True)

asyncio.run(main())
"""


async def test_a_process_that_leaves_an_index_open_still_exits(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import asyncio, sys
        from actors.memory.index import MemoryIndex

        kept = []  # as a traceback or a crashed task keeps it: never collected, never closed

        async def main():
            kept.append(await MemoryIndex.open(sys.argv[1]))

        asyncio.run(main())
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(tmp_path / "open.sqlite")
    )
    try:
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()


async def test_a_killed_writer_leaves_rows_and_position_in_step(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite"
    repo = Path(__file__).resolve().parents[2]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        textwrap.dedent(CRASHER),
        str(path),
        cwd=repo,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"ready"
        await asyncio.sleep(0.5 + random.random())  # killed somewhere inside a later batch
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    idx = await MemoryIndex.open(path)
    try:
        position = await idx.checkpoint()
        assert position >= 3
        assert await idx.count() == 10 * position
        await idx.verify()
    finally:
        await idx.close()


async def test_reindex_equals_the_live_build(tmp_path: Path, embedder: Embedder) -> None:
    records = [
        rec(
            i,
            t,
            session=f"s{i % 3}",
            user="u1" if i % 4 == 0 else None,
            kind="fact" if i % 7 == 0 else "message",
        )
        for i, t in enumerate(DISTRACTORS)
    ]
    live = await MemoryIndex.open(tmp_path / "live.sqlite")
    other = await MemoryIndex.open(tmp_path / "other.sqlite")
    try:
        for i in range(0, len(records), 4):  # the live path: small batches in log order
            await add_texts(live, embedder, records[i : i + 4], checkpoint=i + 4)
        shuffled = records[::-1] + records[:10]  # another order, other batches, redeliveries
        for i in range(0, len(shuffled), 17):
            await add_texts(other, embedder, shuffled[i : i + 17])
        assert await live.dump() == await other.dump()
        assert len(await live.dump()) == len(records)

        await live.reset()  # `veil reindex`
        assert (await live.count(), await live.checkpoint()) == (0, 0)
        assert await ask(live, embedder, "banana bread", session="s0") == []
        await add_texts(live, embedder, records, checkpoint=len(records))
        assert await live.dump() == await other.dump()
        await live.verify()
        await other.verify()
    finally:
        await live.close()
        await other.close()


async def test_a_growing_scope_moves_to_large_chunks_unchanged(
    tmp_path: Path, embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hybrid, "PROMOTE_AT", 16)
    records = [rec(i, t, user="u1", session=f"s{i // 10}") for i, t in enumerate(DISTRACTORS)]
    grown = await MemoryIndex.open(tmp_path / "grown.sqlite")
    small = await MemoryIndex.open(tmp_path / "small.sqlite")
    try:
        for i in range(0, len(records), 6):
            await add_texts(grown, embedder, records[i : i + 6])
        monkeypatch.setattr(hybrid, "PROMOTE_AT", 10_000)
        await add_texts(small, embedder, records)
        assert await grown.dump() == await small.dump()
        assert vec_rows(tmp_path / "grown.sqlite") == {"small": 0, "large": len(records)}
        assert vec_rows(tmp_path / "small.sqlite") == {"small": len(records), "large": 0}
        for idx in (grown, small):
            await idx.verify()
            assert (await ask(idx, embedder, "orchid watering", user="u1"))[0] == "s5:50"
        assert await grown.delete_session("t1", "s1") == 10
        await grown.verify()
        assert len(await ask(grown, embedder, "orchid", user="u1", k=100)) == len(records) - 10
    finally:
        await grown.close()
        await small.close()


# -- erasure --------------------------------------------------------------


async def test_delete_session_leaves_no_bytes_on_disk(tmp_path: Path, embedder: Embedder) -> None:
    path = tmp_path / "memory.sqlite"
    idx = await MemoryIndex.open(path)
    marker = f"qzv{uuid.uuid4().hex[:12]}"
    session = f"sess-{uuid.uuid4().hex[:12]}"
    rng = np.random.default_rng(3)
    secret_vectors: list[bytes] = []
    try:
        for batch in range(6):  # the session's rows interleave with others' in pages and segments
            others = [
                rec(
                    batch * 100 + i,
                    f"{DISTRACTORS[(batch + i) % 50]} note {batch}-{i}",
                    session=f"other{i % 4}",
                    user="u1" if i % 2 else None,
                )
                for i in range(40)
            ]
            mine = [
                rec(
                    batch * 10 + j,
                    f"My locker code is {marker} batch {batch} line {j}",
                    session=session,
                    user="u1" if j % 2 else None,
                    kind="fact" if j == 2 else "message",
                )
                for j in range(4)
            ]
            vectors = rng.standard_normal((44, 384)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            secret_vectors += [vectors[40 + j].tobytes() for j in range(4)]
            await idx.add(others + mine, vectors, checkpoint=batch + 1)
        secret_bits = [quantize(np.frombuffer(v, np.float32)).tobytes() for v in secret_vectors]
        before = file_bytes(path)
        assert marker.encode() in before and session.encode() in before
        assert any(v in before for v in secret_vectors) and any(b in before for b in secret_bits)
        assert await ask(idx, embedder, marker, session=session, user="u1")

        assert await idx.delete_session("t1", session) == 24
        after = file_bytes(path)
        assert marker.encode() not in after
        assert session.encode() not in after
        assert not [v for v in secret_vectors if v in after]
        assert not [b for b in secret_bits if b in after]
        assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
        assert await idx.count() == 240
        hits = await idx.search(
            tenant="t1",
            session_id=session,
            user_id="u1",
            k=500,
            query_vector=embedder.embed([marker])[0],
            query_text=marker,
        )
        assert len(hits) == 120 and not [h for h in hits if marker in h.text]  # u1's other rows
        await idx.verify()
        assert await idx.delete_session("t1", session) == 0
    finally:
        await idx.close()
    assert marker.encode() not in file_bytes(path)


async def test_erasing_many_sessions_then_one_scrub_leaves_no_deleted_text(
    tmp_path: Path,
) -> None:
    # At this size page splits leave stale row copies and FTS5 keeps separator terms:
    # without the scrub, some deleted markers stay readable in the file.
    path = tmp_path / "memory.sqlite"
    idx = await MemoryIndex.open(path)
    rng = np.random.default_rng(5)
    pick = random.Random(5)
    marker_of: dict[str, list[str]] = {}
    try:
        for batch in range(30):
            records = []
            for i in range(500):
                session = f"sess{pick.randrange(300)}"
                marker = f"mk{uuid.uuid4().hex[:14]}"
                marker_of.setdefault(session, []).append(marker)
                records.append(
                    rec(
                        batch * 1000 + i,
                        f"note {marker} and some words {pick.random()}",
                        session=session,
                        user=f"u{i % 3}" if i % 2 else None,
                        rid=f"{batch}:{i}",
                    )
                )
            await idx.add(records, rng.standard_normal((500, 384)))
        erased = sorted(marker_of)[::2]
        total = 0
        for session in erased:
            total += await idx.delete_session("t1", session, scrub=False)
        await idx.scrub()
        await idx.verify()
        assert total == sum(len(marker_of[s]) for s in erased)
        assert await idx.count() == 15_000 - total
        left = set(re.findall(rb"mk[0-9a-f]{14}", file_bytes(path)))
        deleted = {m.encode() for s in erased for m in marker_of[s]}
        kept = {m.encode() for s in marker_of if s not in erased for m in marker_of[s]}
        assert not left & deleted
        assert kept <= left
    finally:
        await idx.close()


async def test_scrub_drops_deleted_words_kept_as_fts_separators(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite"
    idx = await MemoryIndex.open(path)
    try:
        # Neighbouring words share all but their last letter, so the term FTS5 keeps in
        # %_idx to separate two leaves is a whole word: the first one on the next leaf.
        words = [f"zzsecret{n:06d}" for n in range(3000)]
        await idx.add(
            [rec(n, f"code {w}") for n, w in enumerate(words)],
            np.random.default_rng(1).standard_normal((len(words), 384)),
        )
        conn = sqlite.connect(path)
        try:
            rows = conn.execute("SELECT term FROM memory_fts_idx WHERE length(term) > 1").fetchall()
        finally:
            conn.close()
        separators = {bytes(t)[1:].decode() for (t,) in rows} & set(words)
        assert len(separators) > 5
        gone = await idx.delete_ids("t1", [f"s1:{words.index(w)}" for w in separators], scrub=False)
        assert gone == len(separators)
        assert any(w.encode() in file_bytes(path) for w in separators)  # the case scrub exists for
        await idx.scrub()
        after = file_bytes(path)
        assert not [w for w in separators if w.encode() in after]
        assert sum(w.encode() in after for w in words) == len(words) - len(separators)
        await idx.verify()
    finally:
        await idx.close()


async def test_delete_ids_and_reset_scrub_the_file(tmp_path: Path, embedder: Embedder) -> None:
    path = tmp_path / "memory.sqlite"
    idx = await MemoryIndex.open(path)
    try:
        marker = f"qzv{uuid.uuid4().hex[:12]}"
        await add_texts(
            idx,
            embedder,
            [rec(i, f"{t} {marker}{i}") for i, t in enumerate(DISTRACTORS[:30])],
            checkpoint=30,
        )
        assert await idx.delete_ids("t1", ["s1:3", "s1:4", "nope"]) == 2
        assert await idx.delete_ids("t2", ["s1:5"]) == 0
        after = file_bytes(path)
        assert f"{marker}3".encode() not in after and f"{marker}5".encode() in after
        assert await idx.count() == 28
        await idx.verify()
        await idx.reset()
        assert (await idx.count(), await idx.checkpoint()) == (0, 0)
        assert marker.encode() not in file_bytes(path)
        await add_texts(idx, embedder, [rec(1, "fresh start")], checkpoint=1)
        assert await ask(idx, embedder, "fresh start") == ["s1:1"]
    finally:
        await idx.close()


async def test_a_deleted_session_is_never_stored_again(tmp_path: Path, embedder: Embedder) -> None:
    # The projection embeds a batch before it stores it: a deletion can come first.
    path = tmp_path / "memory.sqlite"
    marker = f"qzv{uuid.uuid4().hex[:12]}"
    gone = f"sess-{uuid.uuid4().hex[:12]}"
    mine = [
        rec(i, f"My locker code is {marker} line {i}", session=gone, user="u1" if i % 2 else None)
        for i in range(6)
    ]
    others = [rec(10 + i, DISTRACTORS[i], session="s2") for i in range(4)]
    rng = np.random.default_rng(11)

    def vectors(n: int) -> npt.NDArray[np.float32]:
        return rng.standard_normal((n, 384)).astype(np.float32)

    idx = await MemoryIndex.open(path)
    try:
        await idx.add(mine[:3], vectors(3), checkpoint=1)
        assert await idx.delete_session("t1", gone) == 3
        await idx.add(mine + others, vectors(10), checkpoint=2)  # the batch in flight
        assert (await idx.count(), await idx.checkpoint()) == (4, 2)
        assert await idx.forgotten({("t1", gone), ("t1", "s2"), ("t2", gone)}) == {("t1", gone)}
        # The same session id in another tenant is another session.
        await idx.add([rec(20, "hello there", tenant="t2", session=gone)], vectors(1))
        assert await idx.count() == 5
        await idx.reset()  # a rebuild from the log
        await idx.add(mine + others, vectors(10), checkpoint=2)
        assert await idx.count() == 4
    finally:
        await idx.close()
    idx = await MemoryIndex.open(path)
    try:
        await idx.add(mine, vectors(6), checkpoint=3)
        assert (await idx.count(), await idx.checkpoint()) == (4, 3)
        assert await ask(idx, embedder, marker, session=gone, user="u1") == []
        await idx.verify()
    finally:
        await idx.close()
    data = file_bytes(path)
    assert marker.encode() not in data and gone.encode() not in data  # a digest, not the id
