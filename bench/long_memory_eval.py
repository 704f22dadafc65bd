"""Memory recall on long conversations: Veil's search against plain BM25 over the same items.

The set, bench/data/long_memory.jsonl (made by bench/long_memory_compose.py from
hand-written material, Apache-2.0 like the repository): four conversations between
two friends, 24 dated sessions each, 1,541 turns (370-400 per conversation), and
101 questions written apart from the turns (single-hop, multi-hop, temporal,
open-domain), each with its one evidence turn. Many other turns share the
questions' words (each speaker's recurring themes) without answering them.

Method. Each conversation is one user of one tenant; each of its sessions a Veil
session. Turns are fed in pairs, as a transcript reaches Veil: one chat turn
(turn.started) whose messages are the two lines, each a user message with its
speaker's `name`, and an empty reply; encoded, decoded and turned into records by
the real `records_of` (the turn becomes one item when its reply completes: the two
lines), stored by the real `MemoryIndex` in the projection's batches, embedded by
the real int8 MiniLM.
Questions are asked from a new session of the same user, k=10. A question is
found at k when one of the top k items holds its evidence turn; "tokens@10" is
what the ten items hold together (`actors.tokens.estimate_tokens`), which the
issue caps at 1,500.

Rows: `veil` is the product's recall as it stands (`MemoryIndex.semantic_query`, then
`MemoryIndex.search` with that query's vector), `bm25` the keyword side alone over the
same items, `vector` the vector side alone; `..., whole query` embed the question as
asked, as recall did before it left out the words half the items hold; the
`fuse ...` rows re-fuse the same candidates another way (`--sweep`), and the
`items=...` rows index the same turns as other items (`--items`): `speaker` (one
item a line: the projection before issue 15's exchanges), `context` (each
message with the turn before it, so the reply "Wow, tell me more" carries what it
answers), `exchange` (a turn's message and its reply as one item, what the
projection now makes), `exchange+time` (the same, the day it was said first);
`--dedupe` re-ranks veil's 30 best leaving out an item whose terms overlap a better
one's by a Jaccard of 0.9, 0.7 or 0.5.

    python bench/long_memory_eval.py [--sweep] [--items] [--dedupe] [--misses]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.memory.actor import BATCH
from actors.memory.embedder import Embedder, default_embedder
from actors.memory.index import MemoryIndex, MemoryRecord
from actors.memory.projector import records_of
from actors.search.hybrid import Entry, HybridIndex, Scope, fts_terms
from actors.tokens import estimate_tokens
from bus.codec import Codec
from eventstore.events import (
    ChatMessage,
    EventUnion,
    ReplyCompleted,
    SessionOpened,
    TurnStarted,
    Usage,
)

DATA = Path(__file__).resolve().parent / "data" / "long_memory.jsonl"
TENANT = "longmem"
TYPES = ("single-hop", "multi-hop", "temporal", "open-domain")
CODEC: Codec[EventUnion] = Codec(EventUnion)


class Meta(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="meta"):
    name: str


class SessionLine(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="session"):
    conversation: str
    session: int
    at: datetime


class Turn(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="turn"):
    conversation: str
    session: int
    id: str
    speaker: str
    at: datetime
    text: str


class Question(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="question"):
    conversation: str
    id: str
    type: str
    text: str
    evidence: list[str]
    asked_at: datetime


@dataclass
class LongSet:
    sessions: list[SessionLine] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)


def load(path: Path) -> LongSet:
    decoder = msgspec.json.Decoder(Meta | SessionLine | Turn | Question)
    out = LongSet()
    for raw in path.read_bytes().splitlines():
        match decoder.decode(raw):
            case SessionLine() as s:
                out.sessions.append(s)
            case Turn() as t:
                out.turns.append(t)
            case Question() as q:
                out.questions.append(q)
            case Meta():
                pass
    return out


def session_id(conversation: str, n: int) -> str:
    return f"{conversation}-s{n:02d}"


# -- the log, as the product writes it -------------------------------------------


@dataclass
class Log:
    records: list[MemoryRecord]  # in log order, as `records_of` makes them
    turns_of: dict[str, set[str]]  # memory record id -> the turns its text holds


def pairs(turns: Sequence[Turn]) -> list[tuple[Turn, Turn | None]]:
    """A session's turns two by two: a chat turn's message and its reply."""
    return [
        (turns[i], turns[i + 1] if i + 1 < len(turns) else None) for i in range(0, len(turns), 2)
    ]


def by_session(data: LongSet) -> dict[str, list[Turn]]:
    out: dict[str, list[Turn]] = {}
    for t in data.turns:
        out.setdefault(session_id(t.conversation, t.session), []).append(t)
    return out


def build_log(data: LongSet) -> Log:
    """Every session's events on one stream in time order, as the gateway appends them.

    Two people talk and Veil keeps the transcript: each pair of turns arrives as one
    chat turn whose messages are the two lines, each a user message with its
    speaker's `name` (OpenAI's participant name), and the model's reply says nothing
    worth keeping (an empty reply makes no memory), so the items are the turns.
    """
    timed: list[tuple[datetime, str, EventUnion, list[str]]] = []
    for s in data.sessions:
        sid = session_id(s.conversation, s.session)
        opened = SessionOpened(
            at=s.at, session_id=sid, tenant=TENANT, key_id="k-eval", user_id=s.conversation
        )
        timed.append((s.at, sid, opened, []))
    for sid, turns in by_session(data).items():
        for n, (said, answer) in enumerate(pairs(turns)):
            lines = [said] if answer is None else [said, answer]
            started = TurnStarted(
                at=said.at,
                turn_id=f"{sid}-{n}",
                command_id=f"c-{sid}-{n}",
                model="veil",
                messages=[ChatMessage(role="user", name=t.speaker, content=t.text) for t in lines],
                lease_until=said.at + timedelta(seconds=60),
            )
            done = ReplyCompleted(
                at=lines[-1].at,
                turn_id=started.turn_id,
                content="",
                finish_reason="stop",
                usage=Usage(),
                call=None,
            )
            timed.append((said.at, sid, started, [t.id for t in lines]))
            timed.append((lines[-1].at, sid, done, []))
    timed.sort(key=lambda item: item[0])
    log = Log([], {})
    # What the projector keeps of an open turn: its turn.started, until the turn ends.
    open_turns: dict[str, tuple[TurnStarted, list[str]]] = {}
    for seq, (_, sid, event, turn_ids) in enumerate(timed, 1):
        # Encoded and decoded as the log stores it, so every field is the product's.
        event = CODEC.decode(CODEC.encode(event))
        conversation = sid.rsplit("-s", 1)[0]
        if isinstance(event, TurnStarted):
            open_turns[event.turn_id] = (event, turn_ids)
        started, held = (
            open_turns.pop(event.turn_id) if isinstance(event, ReplyCompleted) else (None, turn_ids)
        )
        records = records_of(sid, seq, event, (TENANT, conversation), started)
        log.records.extend(records)
        for record in records:
            log.turns_of[record.id] = set(held)
    return log


async def ingest(index: MemoryIndex, embedder: Embedder, log: Log) -> float:
    """Seconds to embed and store every record, in batches as the projection does
    (`Projector.apply`: `records_of`, one embedding call, one `add` per batch)."""
    started = time.perf_counter()
    for i in range(0, len(log.records), BATCH):
        part = log.records[i : i + BATCH]
        vectors = await embedder.aembed([r.text for r in part])
        await index.add(part, vectors, checkpoint=i + len(part))
    return time.perf_counter() - started


# -- other items over the same turns ------------------------------------------------


def said(t: Turn) -> str:
    """A turn as an item tells it: its speaker's name first."""
    return f"{t.speaker}: {t.text}"


said_ = said


def other_items(data: LongSet, how: str) -> list[tuple[Entry, str, set[str]]]:
    """(entry, text to embed, turns held) for each item of the `how` kind."""
    out: list[tuple[Entry, str, set[str]]] = []
    for sid, turns in by_session(data).items():
        scope = Scope("u", TENANT, turns[0].conversation)

        def entry(n: str, text: str, t: Turn, sid: str = sid, scope: Scope = scope) -> Entry:
            return Entry(
                scope=scope,
                id=f"{sid}:{n}",
                kind="message",
                role="user",
                text=text,
                source=sid,
                source_seq=0,
                created_at=t.at,
            )

        if how == "speaker":
            for i, t in enumerate(turns):
                out.append((entry(str(i), said_(t), t), said_(t), {t.id}))
        elif how == "context":
            for i, t in enumerate(turns):
                prev = turns[i - 1] if i else None
                text = f"{said_(prev)}\n{said_(t)}" if prev else said_(t)
                out.append((entry(str(i), text, t), text, {t.id} | ({prev.id} if prev else set())))
        elif how in ("exchange", "exchange+time"):
            for i, (said, answer) in enumerate(pairs(turns)):
                text = said_(said) + (f"\n{said_(answer)}" if answer else "")
                if how == "exchange+time":
                    text = f"{said.at:%A %d %B %Y}:\n{text}"
                held = {said.id} | ({answer.id} if answer else set())
                out.append((entry(str(i), text, said), text, held))
        else:
            raise ValueError(how)
    return out


# -- searching -------------------------------------------------------------------------


@dataclass
class Found:
    ids: list[str]
    texts: list[str]


Search = Callable[[Question, npt.NDArray[np.float32]], Awaitable[Found]]


def scopes_of(q: Question) -> list[Scope]:
    return [Scope("s", TENANT, f"{q.conversation}-ask"), Scope("u", TENANT, q.conversation)]


async def fused(
    store: HybridIndex,
    q: Question,
    v: npt.NDArray[np.float32],
    *,
    head: int,
    weight: float,
    pool: int = 40,
    k: int = 10,
) -> Found:
    """The index's own candidates, fused by reciprocal rank with this head and keyword weight."""
    hits = await store.search(
        scopes_of(q),
        query_vector=v,
        query_text=q.text,
        k=k,
        head=head,
        keyword_weight=weight,
        pool=pool,
    )
    return Found([h.id for h in hits], [h.text for h in hits])


@dataclass
class Row:
    name: str
    ranks: list[int | None]  # 1-based rank of the first item holding the evidence
    tokens: list[int]  # tokens the top 10 hold
    ms: list[float]


async def run_row(
    name: str,
    search: Search,
    questions: Sequence[Question],
    vectors: npt.NDArray[np.float32],
    turns_of: dict[str, set[str]],
) -> Row:
    row = Row(name, [], [], [])
    for q, v in zip(questions, vectors, strict=True):
        started = time.perf_counter()
        found = await search(q, v)
        row.ms.append((time.perf_counter() - started) * 1e3)
        rank = next(
            (n for n, i in enumerate(found.ids, 1) if turns_of.get(i, set()) & set(q.evidence)),
            None,
        )
        row.ranks.append(rank)
        row.tokens.append(sum(estimate_tokens(t) for t in found.texts[:10]))
    return row


def at(ranks: Sequence[int | None], k: int) -> float:
    return sum(r is not None and r <= k for r in ranks) / len(ranks)


def print_rows(questions: Sequence[Question], rows: Sequence[Row]) -> None:
    groups = [("all", list(range(len(questions))))] + [
        (t, [i for i, q in enumerate(questions) if q.type == t]) for t in TYPES
    ]
    head = f"{'row':<34}" + "".join(f"{g[:11]:>12}" for g, _ in groups)
    print(head + f"{'tok@10 p50/max':>17}{'ms p50':>8}")
    for row in rows:
        cells = "".join(
            f"{at([row.ranks[i] for i in idx], 5):>6.3f}/{at([row.ranks[i] for i in idx], 10):.2f}"
            for _, idx in groups
        )
        tok = f"{statistics.median(row.tokens):>8.0f}/{max(row.tokens):<5}"
        print(f"{row.name:<34}{cells}   {tok}{statistics.median(row.ms):>7.2f}")
    print("(cells: recall@5/recall@10; n = " + ", ".join(f"{g} {len(i)}" for g, i in groups) + ")")


def without_near_duplicates(found: Found, same: float, k: int = 10) -> Found:
    """The first k items, leaving out one whose terms overlap (Jaccard) an item kept
    before it by `same` or more."""
    kept: list[int] = []
    terms = [set(fts_terms(t)) for t in found.texts]
    for i, words in enumerate(terms):
        if len(kept) == k:
            break
        if all(len(words & terms[j]) / max(1, len(words | terms[j])) < same for j in kept):
            kept.append(i)
    return Found([found.ids[i] for i in kept], [found.texts[i] for i in kept])


async def evaluate(
    data: LongSet, sweep: bool, items: bool, misses: bool, dedupe: bool = False
) -> None:
    log = build_log(data)
    embedder = default_embedder()
    questions = data.questions
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="veil-longmem-") as tmp:
        index = await MemoryIndex.open(Path(tmp) / "memory.db", model=embedder.model_id)
        try:
            took = await ingest(index, embedder, log)
            count = await index.count()
            print(
                f"long memory eval: {len(questions)} questions over {count:,} items "
                f"({len(data.turns):,} turns, {len(data.sessions)} sessions, "
                f"{len({t.conversation for t in data.turns})} conversations); "
                f"embedded and indexed in {took:.1f} s "
                f"({took / count * 1e3:.2f} ms an item)\n"
            )
            # What recall embeds: the question less the words most items hold
            # (`MemoryIndex.semantic_query`); the `whole query` rows embed it as asked.
            semantic = [
                await index.semantic_query(
                    tenant=TENANT,
                    session_id=f"{q.conversation}-ask",
                    user_id=q.conversation,
                    query_text=q.text,
                )
                for q in questions
            ]
            whole = embedder.embed([q.text for q in questions])
            vectors = embedder.embed(semantic)
            embedded = dict(zip(semantic, vectors, strict=True))

            def memory(mode: str) -> Search:
                async def search(q: Question, v: npt.NDArray[np.float32]) -> Found:
                    args = {"tenant": TENANT, "session_id": f"{q.conversation}-ask"}
                    if mode == "veil":
                        # Timed with the look-up of the words left out (embedded before).
                        text = await index.semantic_query(
                            **args, user_id=q.conversation, query_text=q.text
                        )
                        hits = await index.search(
                            **args,
                            user_id=q.conversation,
                            query_vector=embedded[text],
                            query_text=q.text,
                            k=10,
                        )
                    elif mode == "veil, whole query":
                        hits = await index.search(
                            **args, user_id=q.conversation, query_vector=v, query_text=q.text, k=10
                        )
                    elif mode == "bm25":
                        hits = await index.keyword_search(
                            **args, user_id=q.conversation, query_text=q.text, k=10
                        )
                    else:
                        hits = await index.vector_search(
                            **args, user_id=q.conversation, query_vector=v, k=10
                        )
                    return Found([h.id for h in hits], [h.text for h in hits])

                return search

            for mode, asked in (
                ("veil", vectors),
                ("veil, whole query", whole),
                ("bm25", vectors),
                ("vector", vectors),
                ("vector, whole query", whole),
            ):
                rows.append(await run_row(mode, memory(mode), questions, asked, log.turns_of))
            if dedupe:
                for same in (0.9, 0.7, 0.5):

                    async def distinct(
                        q: Question, v: npt.NDArray[np.float32], same: float = same
                    ) -> Found:
                        found = await fused(index.store, q, v, head=10, weight=1.0, k=30)
                        return without_near_duplicates(found, same)

                    name = f"veil, near-duplicates >= {same} out"
                    rows.append(await run_row(name, distinct, questions, vectors, log.turns_of))
            if sweep:
                for head, weight, pool in (
                    (10, 0.5, 40),
                    (10, 1.0, 40),
                    (20, 1.0, 40),
                    (40, 1.0, 40),
                    (20, 0.5, 40),
                    (40, 0.5, 40),
                    (60, 1.0, 60),
                    (100, 1.0, 100),
                    (40, 1.5, 40),
                    (40, 2.0, 40),
                    (10, 0.25, 40),
                    (20, 0.25, 40),
                    (40, 0.25, 40),
                    (20, 0.5, 60),
                ):

                    async def search(
                        q: Question,
                        v: npt.NDArray[np.float32],
                        head: int = head,
                        weight: float = weight,
                        pool: int = pool,
                    ) -> Found:
                        return await fused(index.store, q, v, head=head, weight=weight, pool=pool)

                    name = f"fuse head {head} kw {weight} pool {pool}"
                    rows.append(await run_row(name, search, questions, vectors, log.turns_of))
            if misses:
                print_misses(questions, rows[0], log, index)
        finally:
            await index.close()
        if items:
            for how in ("speaker", "context", "exchange", "exchange+time"):
                rows.extend(await item_rows(data, how, Path(tmp), questions, vectors))
    print_rows(questions, rows)


async def item_rows(
    data: LongSet,
    how: str,
    tmp: Path,
    questions: Sequence[Question],
    vectors: npt.NDArray[np.float32],
) -> list[Row]:
    embedder = default_embedder()
    made = other_items(data, how)
    store = await HybridIndex.open(tmp / f"{how}.db", model=embedder.model_id)
    try:
        started = time.perf_counter()
        vecs = embedder.embed([text for _, text, _ in made])
        await store.add([e for e, _, _ in made], vecs)
        took = time.perf_counter() - started
        print(f"items={how}: {len(made):,} items, embedded and stored in {took:.1f} s")
        turns_of = {e.id: held for e, _, held in made}
        out = []
        for head, weight in ((10, 0.5), (10, 1.0), (40, 1.0)):

            async def search(
                q: Question, v: npt.NDArray[np.float32], head: int = head, weight: float = weight
            ) -> Found:
                return await fused(store, q, v, head=head, weight=weight)

            name = f"items={how} head {head} kw {weight}"
            out.append(await run_row(name, search, questions, vectors, turns_of))

        async def bm25(q: Question, v: npt.NDArray[np.float32]) -> Found:
            hits = await store.keyword_search(scopes_of(q), query_text=q.text, k=10)
            return Found([h.id for h in hits], [h.text for h in hits])

        out.append(await run_row(f"items={how} bm25", bm25, questions, vectors, turns_of))
        return out
    finally:
        await store.close()


def print_misses(questions: Sequence[Question], row: Row, log: Log, index: MemoryIndex) -> None:
    print("veil misses at 10:")
    for q, rank in zip(questions, row.ranks, strict=True):
        if rank is None:
            print(f"  {q.id:<8} {q.type:<12} {q.text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--sweep", action="store_true", help="re-fuse with other heads, weights")
    parser.add_argument("--items", action="store_true", help="index the turns as other items")
    parser.add_argument("--misses", action="store_true", help="list what veil misses at 10")
    parser.add_argument(
        "--dedupe", action="store_true", help="leave near-duplicates out of veil's top 10"
    )
    args = parser.parse_args()
    asyncio.run(evaluate(load(args.data), args.sweep, args.items, args.misses, args.dedupe))


if __name__ == "__main__":
    main()
