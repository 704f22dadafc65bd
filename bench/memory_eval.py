"""Retrieval quality of long-term memory: hybrid search against keyword-only and vector-only.

The set, bench/data/memory_eval.jsonl (written for this project, Apache-2.0 like the
repository; no third-party text, nothing downloaded):

- 3 tenants, 10 named users (acme: maria, tom, priya, daniel, sofia; globex: maria, tom,
  kenji, anna, oliver) with 4-5 sessions each of 18-34 turns, and 3 anonymous sessions
  (tenant initech, the client names no user) of 24-27 turns: 45 sessions, 1,189 turns,
  2,378 messages (188-262 per named user), each turn a user message and a realistic
  assistant reply.
- 137 questions (71 paraphrase, 31 keyword, 35 distractor), 111 asked in a new session
  of the same user, 26 at the end of the user's last session (all of the anonymous ones,
  since an anonymous session sees only itself). Each answer sits in exactly one earlier
  user message, labelled by its id.
- How it was made: personal facts (names, dates, numbers, addresses, allergies, pets,
  plans, project names), their questions, persona chit-chat and 257 exchanges of everyday
  filler (cooking, code, email, travel, money, home, small talk...) were all written by
  hand; a small composer spread them over sessions at random (seeded) and checked the set:
  the answer string occurs in the evidence and in no other message the question can see
  (filler containing a user's answer is never given to that user, replies never repeat
  the fact); a "paraphrase" question shares no indexed term (`fts_terms`, stop words out)
  with its evidence, a "keyword" question shares at least one rare one (a name, code or
  number), a "distractor" question has a similar but wrong fact elsewhere in its scope
  (two dates, an old and a new address, two door codes...), labelled in `distractor_ids`.
- Scoping: globex/maria and globex/tom share their user ids with acme/maria and acme/tom,
  with the same kinds of facts and word-for-word the same questions but other answers;
  acme/daniel asks acme/maria's school question and globex/anna globex/maria's spouse
  question; two anonymous sessions of one tenant hold different gym locker codes. A hit the
  question's scope must not see counts as a failure and is counted separately: it must be 0.

Method. Every session's events (session.opened, turn.started with the user's message,
reply.completed) are encoded and fed to the real `Projector`, so records, their ids and
owners are exactly the product's; embeddings are the real int8 all-MiniLM-L6-v2. The
questions themselves are not indexed: in the product a turn's message reaches the index
only after its turn, and recall runs at its start. Each question is searched with its
scope (tenant, its session, its user), k=10, by `search` (hybrid), `keyword_search` and
`vector_search`; the query is the question, as the session actor's query is the user's
latest message.

Run from the repository root (20-35 s on 2 cores, most of it embedding 2,378 messages):

    python bench/memory_eval.py [--repeat 3] [--misses]
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
from typing import cast

import msgspec
import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.memory import index as memory_index
from actors.memory.actor import BATCH
from actors.memory.embedder import default_embedder
from actors.memory.index import MemoryIndex
from actors.memory.projector import Projector, records_of
from actors.memory.prompting import choose_memories
from bench._stats import percentile
from bus.codec import Codec
from bus.subjects import session_events
from config import MemoryPolicy
from contracts.memory import MemoryHit
from eventstore.events import (
    ChatMessage,
    EventUnion,
    ReplyCompleted,
    SessionOpened,
    TurnStarted,
    Usage,
)
from eventstore.store import EventStore, StoredEvent

__all__ = ["main"]

DATA = Path(__file__).resolve().parent / "data" / "memory_eval.jsonl"
K = 10
MODES = ("hybrid", "keyword", "vector")
#: Hybrid with the question embedded whole, as recall did before `semantic_query`.
WHOLE = "hybrid, whole query"
TYPES = ("paraphrase", "keyword", "distractor")
CODEC: Codec[EventUnion] = Codec(EventUnion)


# -- the set -----------------------------------------------------------------


class Meta(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="meta"):
    name: str
    version: int
    licence: str


class SessionLine(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="session"):
    session_id: str
    tenant: str
    user_id: str | None
    opened_at: datetime


class Message(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    text: str


class TurnLine(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="turn"):
    session_id: str
    turn: int
    at: datetime
    user: Message
    assistant: Message


class Question(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="question"):
    id: str
    tenant: str
    user_id: str | None
    session_id: str
    asked: str
    text: str
    type: str
    answer_id: str
    answer: str
    distractor_ids: list[str]


Line = Meta | SessionLine | TurnLine | Question


@dataclass
class EvalSet:
    sessions: list[SessionLine] = field(default_factory=list)
    turns: list[TurnLine] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)


def load(path: Path) -> EvalSet:
    decoder = msgspec.json.Decoder(Line)
    out = EvalSet()
    for raw in path.read_bytes().splitlines():
        match decoder.decode(raw):
            case SessionLine() as s:
                out.sessions.append(s)
            case TurnLine() as t:
                out.turns.append(t)
            case Question() as q:
                out.questions.append(q)
            case Meta():
                pass
    return out


# -- the log, as the product writes it ------------------------------------------

# (tenant, user_id, session_id) of a record: what a search may or may not see.
Owner = tuple[str, str | None, str]


@dataclass
class Log:
    batch: list[tuple[str, int, bytes]]  # (subject, stream seq, event bytes)
    record_of: dict[str, str]  # dataset message id -> memory record id
    owner_of: dict[str, Owner]  # memory record id -> its owner


# Events the product appends just before these ones and the projector ignores (memory.recalled
# and model.called come between a turn's start and its reply): they only take log positions.
_IGNORED_BEFORE: dict[type, int] = {SessionOpened: 0, TurnStarted: 0, ReplyCompleted: 2}


def build_log(data: EvalSet) -> Log:
    """Events of every session in time order on one stream, as the gateway appends them."""
    timed: list[tuple[datetime, str, EventUnion, str | None]] = []
    for s in data.sessions:
        opened = SessionOpened(
            at=s.opened_at,
            session_id=s.session_id,
            tenant=s.tenant,
            key_id="k-eval",
            user_id=s.user_id,
        )
        timed.append((s.opened_at, s.session_id, opened, None))
    for t in data.turns:
        started = TurnStarted(
            at=t.at,
            turn_id=f"{t.session_id}-{t.turn}",
            command_id=f"c-{t.session_id}-{t.turn}",
            model="veil",
            messages=[ChatMessage(role="user", content=t.user.text)],
            lease_until=t.at + timedelta(seconds=60),
        )
        done = ReplyCompleted(
            at=t.at + timedelta(seconds=8),
            turn_id=started.turn_id,
            content=t.assistant.text,
            finish_reason="stop",
            usage=Usage(),
            call=None,
        )
        timed.append((t.at, t.session_id, started, t.user.id))
        timed.append((done.at, t.session_id, done, t.assistant.id))
    timed.sort(key=lambda item: item[0])  # stable: an opening precedes its session's turns
    owners = {s.session_id: (s.tenant, s.user_id) for s in data.sessions}
    log = Log([], {}, {})
    seq = 0
    # A turn is one item when its reply completes (actors.memory.items): its user message
    # and its reply are found as that item.
    open_turns: dict[str, tuple[TurnStarted, str | None]] = {}
    for _, session_id, event, message_id in timed:
        seq += 1 + _IGNORED_BEFORE[type(event)]
        log.batch.append(
            (session_events(owners[session_id][0], session_id), seq, CODEC.encode(event))
        )
        if isinstance(event, TurnStarted):
            open_turns[event.turn_id] = (event, message_id)
            continue
        started, asked_id = (
            open_turns.pop(event.turn_id) if isinstance(event, ReplyCompleted) else (None, None)
        )
        for record in records_of(session_id, seq, event, owners[session_id], started):
            for held in (asked_id, message_id):
                if held is not None:
                    log.record_of.setdefault(held, record.id)
            log.owner_of[record.id] = (record.tenant, record.user_id, record.session_id)
    return log


class _NoStore:
    """The projector reads the store only for a session opened, or a turn started, before
    its batch: never here, the whole log goes through it."""

    async def first(self, tenant: str, session_id: str) -> StoredEvent | None:
        raise AssertionError(f"session {session_id} opened outside the log")

    async def load(self, tenant: str, session_id: str, after: int = 0) -> list[StoredEvent]:
        raise AssertionError(f"a turn of {session_id} started outside the log")


async def ingest(index: MemoryIndex, log: Log) -> float:
    """Seconds to embed and index the whole log, in the memory actor's batch size."""
    projector = Projector(index, default_embedder(), cast(EventStore, _NoStore()))
    started = time.perf_counter()
    for i in range(0, len(log.batch), BATCH):
        await projector.apply(log.batch[i : i + BATCH])
    return time.perf_counter() - started


# -- searching and scoring ------------------------------------------------------


@dataclass
class Outcome:
    rank: int | None  # 1-based rank of the answer in the top K, None if missed
    leaks: int  # hits from outside the question's scope
    distractor_first: bool  # a distractor ranked above the answer (or the answer missed)
    hits: list[MemoryHit]


def in_scope(q: Question, owner: Owner) -> bool:
    tenant, user_id, session_id = owner
    if tenant != q.tenant:
        return False
    if user_id is not None:
        return user_id == q.user_id
    return session_id == q.session_id


def score(q: Question, hits: Sequence[MemoryHit], log: Log) -> Outcome:
    ids = [h.id for h in hits]
    answer = log.record_of[q.answer_id]
    rank = ids.index(answer) + 1 if answer in ids else None
    leaks = sum(not in_scope(q, log.owner_of[i]) for i in ids)
    distractors = {log.record_of[d] for d in q.distractor_ids}
    first_distractor = next((n for n, i in enumerate(ids, 1) if i in distractors), None)
    distractor_first = first_distractor is not None and (rank is None or first_distractor < rank)
    # A leak fails the question outright: the model would have seen someone else's memory.
    return Outcome(None if leaks else rank, leaks, distractor_first, list(hits))


Search = Callable[[Question, npt.NDArray[np.float32], int], Awaitable[list[MemoryHit]]]


def searches(index: MemoryIndex) -> dict[str, Search]:
    """The three recall modes, each searching the question's own scope."""

    async def hybrid(q: Question, v: npt.NDArray[np.float32], k: int) -> list[MemoryHit]:
        return await index.search(
            tenant=q.tenant,
            session_id=q.session_id,
            user_id=q.user_id,
            query_vector=v,
            query_text=q.text,
            k=k,
        )

    async def keyword(q: Question, v: npt.NDArray[np.float32], k: int) -> list[MemoryHit]:
        return await index.keyword_search(
            tenant=q.tenant, session_id=q.session_id, user_id=q.user_id, query_text=q.text, k=k
        )

    async def vector(q: Question, v: npt.NDArray[np.float32], k: int) -> list[MemoryHit]:
        return await index.vector_search(
            tenant=q.tenant, session_id=q.session_id, user_id=q.user_id, query_vector=v, k=k
        )

    return {"hybrid": hybrid, "keyword": keyword, "vector": vector}


async def run_mode(
    search: Search,
    questions: Sequence[Question],
    vectors: npt.NDArray[np.float32],
    log: Log,
    repeat: int,
) -> tuple[list[Outcome], list[float]]:
    """Outcomes of a first pass, which also warms the caches; latencies (ms) of `repeat` more."""
    outcomes = [
        score(q, await search(q, v, K), log) for q, v in zip(questions, vectors, strict=True)
    ]
    latencies: list[float] = []
    for _ in range(repeat):
        for q, v in zip(questions, vectors, strict=True):
            started = time.perf_counter()
            await search(q, v, K)
            latencies.append((time.perf_counter() - started) * 1e3)
    return outcomes, latencies


# -- reporting -----------------------------------------------------------------


def metrics(outcomes: Sequence[Outcome]) -> tuple[float, float, float, float]:
    """recall@1, recall@5, recall@10 and MRR@10."""
    n = len(outcomes)
    ranks = [o.rank for o in outcomes]
    at = [sum(r is not None and r <= k for r in ranks) / n for k in (1, 5, 10)]
    mrr = sum(1 / r for r in ranks if r is not None) / n
    return at[0], at[1], at[2], mrr


def print_quality(questions: Sequence[Question], results: dict[str, list[Outcome]]) -> None:
    print(f"{'type':<11}{'n':>4}  {'mode':<8}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'MRR':>7}")
    groups = [("all", list(range(len(questions))))] + [
        (t, [i for i, q in enumerate(questions) if q.type == t]) for t in TYPES
    ]
    for name, idx in groups:
        for j, mode in enumerate(MODES):
            r1, r5, r10, mrr = metrics([results[mode][i] for i in idx])
            head = f"{name:<11}{len(idx):>4}" if j == 0 else " " * 15
            print(f"{head}  {mode:<8}{r1:>7.3f}{r5:>7.3f}{r10:>7.3f}{mrr:>7.3f}")
        print()


def print_sides(questions: Sequence[Question], results: dict[str, list[Outcome]]) -> None:
    """Where fusion helps or hurts: answers each side had in its top 5, and who holds the slots."""
    top5 = {m: [o.rank is not None and o.rank <= 5 for o in results[m]] for m in MODES}
    lost = sum(v and not h for v, h in zip(top5["vector"], top5["hybrid"], strict=True))
    gained = sum(h and not v for v, h in zip(top5["vector"], top5["hybrid"], strict=True))
    print(
        f"answers in the top 5: vector had and hybrid lost {lost}, hybrid had and vector "
        f"did not {gained}"
    )
    slots = {"both sides": 0, "vector only": 0, "keyword only": 0}
    for q, o in zip(questions, results["hybrid"], strict=True):
        if q.type != "paraphrase":
            continue
        for h in o.hits[:5]:
            if h.vector_rank is not None and h.keyword_rank is not None:
                slots["both sides"] += 1
            else:
                slots["vector only" if h.vector_rank is not None else "keyword only"] += 1
    print(
        "hybrid top-5 slots on paraphrase questions (no answer shares a word with its "
        "question), by the side that found the hit: "
        + ", ".join(f"{k} {v}" for k, v in slots.items())
    )


def print_misses(questions: Sequence[Question], results: dict[str, list[Outcome]]) -> None:
    """Questions hybrid misses in its top 5, with every mode's rank and hybrid's first hit."""
    print("hybrid misses at 5 (rank per mode, '-' = not in the top 10):")
    for i, q in enumerate(questions):
        if (results["hybrid"][i].rank or K + 1) <= 5:
            continue
        ranks = " ".join(f"{m[:3]}={results[m][i].rank or '-'}" for m in MODES)
        top = results["hybrid"][i].hits[0].text[:70] if results["hybrid"][i].hits else ""
        print(f"  {q.id:<22} {q.type:<10} {ranks:<20} {q.text}")
        print(f"  {'':<22} first hit: {top!r}")


@dataclass
class Results:
    ingest_s: float
    outcomes: dict[str, list[Outcome]]
    latency_ms: dict[str, list[float]]
    embed_ms: list[float]
    injected: int  # answers that would reach the prompt


def embed_latency(questions: Sequence[Question]) -> list[float]:
    """One query at a time, as recall embeds it."""
    embedder = default_embedder()
    samples = []
    for q in questions:
        started = time.perf_counter()
        embedder.embed([q.text])
        samples.append((time.perf_counter() - started) * 1e3)
    return samples


async def count_injected(
    index: MemoryIndex, questions: Sequence[Question], vectors: npt.NDArray[np.float32], log: Log
) -> int:
    """Answers that pass the session actor's filter into the prompt (default memory policy)."""
    policy = MemoryPolicy()
    hybrid = searches(index)["hybrid"]
    injected = 0
    for q, v in zip(questions, vectors, strict=True):
        chosen = choose_memories(await hybrid(q, v, policy.k), set(), policy)
        injected += log.record_of[q.answer_id] in {h.id for h in chosen}
    return injected


FUSIONS = ((10, 1.0), (10, 0.5), (20, 0.5), (20, 0.25), (20, 1.0))


async def sweep_fusion(
    index: MemoryIndex, questions: Sequence[Question], vectors: npt.NDArray[np.float32], log: Log
) -> None:
    """Hybrid recall with other fusion heads and keyword weights (memory's own constants,
    set for the run and put back)."""
    kept = memory_index.FUSED_HEAD, memory_index.KEYWORD_WEIGHT
    print("fusion sweep (hybrid):")
    try:
        for head, weight in FUSIONS:
            memory_index.FUSED_HEAD, memory_index.KEYWORD_WEIGHT = head, weight
            outcomes, _ = await run_mode(searches(index)["hybrid"], questions, vectors, log, 0)
            r1, r5, r10, _ = metrics(outcomes)
            print(f"  head {head:>3} kw {weight:<5} R@1 {r1:.3f} R@5 {r5:.3f} R@10 {r10:.3f}")
    finally:
        memory_index.FUSED_HEAD, memory_index.KEYWORD_WEIGHT = kept


async def evaluate(data: EvalSet, log: Log, repeat: int, fusion: bool = False) -> Results:
    with tempfile.TemporaryDirectory(prefix="veil-memeval-") as tmp:
        index = await MemoryIndex.open(Path(tmp) / "memory.db")
        try:
            took = await ingest(index, log)
            assert await index.count() == len(log.owner_of)
            # What recall embeds (`MemoryIndex.semantic_query`), and the question as asked.
            semantic = [
                await index.semantic_query(
                    tenant=q.tenant, session_id=q.session_id, user_id=q.user_id, query_text=q.text
                )
                for q in data.questions
            ]
            vectors = default_embedder().embed(semantic)
            whole = default_embedder().embed([q.text for q in data.questions])
            outcomes: dict[str, list[Outcome]] = {}
            latency: dict[str, list[float]] = {}
            for mode, search in searches(index).items():
                outcomes[mode], latency[mode] = await run_mode(
                    search, data.questions, vectors, log, repeat
                )
            outcomes[WHOLE], _ = await run_mode(
                searches(index)["hybrid"], data.questions, whole, log, 0
            )
            injected = await count_injected(index, data.questions, vectors, log)
            if fusion:
                await sweep_fusion(index, data.questions, vectors, log)
        finally:
            await index.close()
    return Results(took, outcomes, latency, embed_latency(data.questions), injected)


def report(data: EvalSet, log: Log, res: Results, repeat: int) -> None:
    questions, outcomes = data.questions, res.outcomes
    users = {(s.tenant, s.user_id) for s in data.sessions if s.user_id is not None}
    anonymous = sum(s.user_id is None for s in data.sessions)
    n = len(questions)
    print(
        f"memory eval: {n} questions over {len(log.owner_of):,} items (a turn each) in "
        f"{len(data.sessions)} sessions ({len(users)} users + {anonymous} anonymous sessions, "
        f"{len({s.tenant for s in data.sessions})} tenants)"
    )
    print(f"ingest: embedded and indexed through the Projector in {res.ingest_s:.1f} s\n")
    print_quality(questions, outcomes)
    r1, r5, r10, mrr = metrics(outcomes[WHOLE])
    print(f"{WHOLE}: R@1 {r1:.3f} R@5 {r5:.3f} R@10 {r10:.3f} MRR {mrr:.3f}\n")
    print_sides(questions, outcomes)
    print(
        f"distractor ranked above the answer (or answer missed), of "
        f"{sum(q.type == 'distractor' for q in questions)}: "
        + ", ".join(f"{m} {sum(o.distractor_first for o in outcomes[m])}" for m in MODES)
    )
    policy = MemoryPolicy()
    print(
        f"answer injected into the prompt (hybrid, k={policy.k}, inject<={policy.inject}, "
        f"min_similarity {policy.min_similarity}, {policy.budget} tokens): "
        f"{res.injected}/{n} = {res.injected / n:.3f}"
    )
    print(
        "out-of-scope hits (other tenant, other user, other anonymous session; must be 0): "
        + ", ".join(
            f"{m} {sum(o.leaks for o in outcomes[m])} of {sum(len(o.hits) for o in outcomes[m])}"
            for m in MODES
        )
    )
    print(f"\nlatency per query, ms ({repeat} warm passes of {n} queries, search only):")
    for name, samples in [*res.latency_ms.items(), ("embed", res.embed_ms)]:
        print(
            f"  {name:<8} p50 {statistics.median(samples):6.2f}   p99 {percentile(samples, 99):6.2f}"
        )
    print("  (embedding the query adds to hybrid and vector recall)")


async def run(data: EvalSet, repeat: int, show_misses: bool, fusion: bool = False) -> int:
    """Exit status 1 when any search returned a memory outside the question's scope."""
    log = build_log(data)
    assert len(log.owner_of) == len(data.turns)  # ids are unique across tenants here
    res = await evaluate(data, log, repeat, fusion)
    report(data, log, res, repeat)
    if show_misses:
        print()
        print_misses(data.questions, res.outcomes)
    return 1 if any(o.leaks for mode in MODES for o in res.outcomes[mode]) else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument(
        "--repeat", type=int, default=3, help="passes over the questions for latency"
    )
    parser.add_argument("--misses", action="store_true", help="list what hybrid misses at 5")
    parser.add_argument("--fusion", action="store_true", help="hybrid with other fusion heads")
    args = parser.parse_args()
    sys.exit(asyncio.run(run(load(args.data), args.repeat, args.misses, args.fusion)))


if __name__ == "__main__":
    main()
