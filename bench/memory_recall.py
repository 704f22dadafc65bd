"""Memory recall benchmark: latency at 10k, 100k and 1M stored memories, and ingestion rates.

Run: python bench/memory_recall.py [--quick] [--dir DIR] [--items message|exchange|both]

`--items`: what one memory holds. `message`: one chat message (the projection
before issue 15's exchanges); `exchange` (the default): a user's message and the
reply, as `actors.memory.items.exchange` writes them, about twice as long.
`both` runs the two back to back, each on a fresh index, for a before/after.

Texts are synthetic chat lines built from word lists (with a Zipf-distributed
vocabulary of made-up names, so keyword document frequencies look like real text).
A probe set of real sentences is embedded with the real model and planted in the
searched scope; the bulk filler gets random unit vectors, because embedding a
million sentences would take about an hour on this machine. The searched scope is
one user's partition (plus the session's own), as the product partitions it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.memory.embedder import Embedder
from actors.memory.index import VECTOR_CANDIDATES, MemoryIndex, MemoryRecord
from actors.memory.items import exchange as exchange_text
from bench._stats import percentile
from eventstore.events import ChatMessage

TENANT = "acme"
USER = "u-heavy"
SESSION = "s-live"

_SUBJECTS = [
    "My sister",
    "My boss",
    "The new intern",
    "Our landlord",
    "My doctor",
    "The team lead",
    "My neighbour",
    "Grandma",
    "The client",
    "My flatmate",
    "Our accountant",
    "The plumber",
    "My best friend",
    "The teacher",
    "My cousin",
    "The vet",
    "Our CTO",
    "My trainer",
]
_VERBS = [
    "is moving to",
    "just got back from",
    "wants to visit",
    "keeps talking about",
    "is worried about",
    "recommended",
    "complained about",
    "booked a trip to",
    "is allergic to",
    "loves",
    "can't stand",
    "is learning about",
    "wrote an essay on",
    "bought",
    "forgot about",
    "asked me about",
    "is reading about",
    "cancelled",
]
_OBJECTS = [
    "Lisbon",
    "the quarterly budget",
    "sourdough bread",
    "a vintage bicycle",
    "the dentist appointment",
    "peanuts",
    "jazz piano",
    "the kubernetes migration",
    "Japanese gardens",
    "the tax return",
    "a golden retriever puppy",
    "marathon training",
    "the wedding in June",
    "electric cars",
    "the broken dishwasher",
    "quantum computing",
    "a used Volvo",
    "the book club",
    "our server outage",
    "Italian opera",
    "rock climbing",
    "the mortgage rate",
    "a trip to Norway",
    "vegan recipes",
    "the school play",
    "chess openings",
    "the leaking roof",
    "birdwatching",
    "a new laptop",
    "the office party",
]
_TAILS = [
    "",
    " next week",
    " again",
    " yesterday",
    " since March",
    " every weekend",
    " for the third time",
    " before the holidays",
    " at the moment",
    " after work",
]
_QUESTIONS = [
    "What do you think about {o}?",
    "Can you help me plan {o}?",
    "Remind me later about {o}.",
    "How much does {o} usually cost?",
    "Tell me something interesting about {o}.",
    "I need advice on {o}.",
]
_ANSWERS = [
    "Sure, here is a short plan for {o}.",
    "Many people find {o} rewarding.",
    "I would start by reading about {o} for an hour.",
    "It depends on your budget, but {o} can be affordable.",
]
_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ren",
    "tor",
    "va",
    "quin",
    "zel",
    "bar",
    "dus",
    "fen",
    "gri",
    "hol",
    "jas",
    "mur",
    "nox",
    "pel",
    "ros",
    "sil",
    "tam",
    "ul",
    "wex",
    "yor",
    "zan",
]


class TextMaker:
    """Chat-like lines: templates plus a Zipf vocabulary of names (project, pet, street...)."""

    def __init__(self, seed: int, vocabulary: int = 20_000, *, exchange: bool = False) -> None:
        self.exchange = exchange
        self.rng = random.Random(seed)
        words: set[str] = set()
        while len(words) < vocabulary:
            words.add("".join(self.rng.choices(_SYLLABLES, k=self.rng.randint(2, 4))))
        self.names = sorted(words)
        weights = 1.0 / np.arange(1, vocabulary + 1)
        self.cdf = np.cumsum(weights / weights.sum())

    def name(self) -> str:
        i = int(np.searchsorted(self.cdf, self.rng.random()))
        return self.names[min(i, len(self.names) - 1)].capitalize()

    def line(self) -> str:
        r = self.rng
        o = r.choice(_OBJECTS) if r.random() < 0.7 else f"{r.choice(_OBJECTS)} with {self.name()}"
        k = r.random()
        if k < 0.5:
            return f"{r.choice(_SUBJECTS)} {r.choice(_VERBS)} {o}{r.choice(_TAILS)}."
        if k < 0.75:
            return r.choice(_QUESTIONS).format(o=o)
        return r.choice(_ANSWERS).format(o=o)

    def message(self) -> str:
        said = self.line() + (" " + self.line() if self.rng.random() < 0.5 else "")
        if not self.exchange:
            return said
        reply = self.line() + (" " + self.line() if self.rng.random() < 0.5 else "")
        return exchange_text([ChatMessage(role="user", content=said)], reply)


def random_units(rng: np.random.Generator, n: int, dim: int) -> npt.NDArray[np.float32]:
    x: npt.NDArray[np.float32] = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def records(
    prefix: str,
    texts: list[str],
    *,
    user: str | None,
    session: str,
    start: int,
    tenant: str = TENANT,
) -> list[MemoryRecord]:
    now = datetime.now(UTC)
    return [
        MemoryRecord(
            id=f"{prefix}:{start + i}",
            tenant=tenant,
            user_id=user,
            session_id=session,
            kind="message",
            role="user" if i % 2 else "assistant",
            text=t,
            source_seq=start + i,
            created_at=now,
        )
        for i, t in enumerate(texts)
    ]


class Filler:
    """Bulk records with random vectors; counts index-only insert time."""

    def __init__(self, index: MemoryIndex, seed: int, *, exchange: bool) -> None:
        self.index = index
        self.texts = TextMaker(seed, exchange=exchange)
        self.rng = np.random.default_rng(seed)
        self.seconds = 0.0
        self.rows = 0
        self.seq = 0

    async def fill(
        self, n: int, owners: Iterator[tuple[str | None, str]], batch: int = 2000
    ) -> None:
        done = 0
        while done < n:
            size = min(batch, n - done)
            user, session = next(owners)
            texts = [self.texts.message() for _ in range(size)]
            recs = records(f"f{self.seq}", texts, user=user, session=session, start=0)
            vecs = random_units(self.rng, size, self.index.dim)
            self.seq += 1
            t0 = time.perf_counter()
            await self.index.add(recs, vecs, checkpoint=self.seq)
            self.seconds += time.perf_counter() - t0
            self.rows += size
            done += size


def spread() -> Iterator[tuple[str | None, str]]:
    """Other owners, one per batch: four users for each anonymous session."""
    i = 0
    while True:
        i += 1
        yield (f"user-{i}", f"sess-{i}") if i % 5 else (None, f"anon-{i}")


async def measure(
    index: MemoryIndex,
    queries: list[str],
    qvecs: npt.NDArray[np.float32],
    label: str,
    stored: int,
    scope: int,
    who: tuple[str, str | None] = (SESSION, USER),
) -> None:
    session, user = who
    for name in ("hybrid", "vector", "keyword"):
        times: list[float] = []
        for _ in range(2):
            for text, vec in zip(queries, qvecs, strict=True):
                t0 = time.perf_counter()
                if name == "hybrid":
                    await index.search(
                        tenant=TENANT,
                        session_id=session,
                        user_id=user,
                        query_vector=vec,
                        query_text=text,
                        k=10,
                    )
                elif name == "vector":
                    await index.vector_search(
                        tenant=TENANT, session_id=session, user_id=user, query_vector=vec, k=10
                    )
                else:
                    await index.keyword_search(
                        tenant=TENANT, session_id=session, user_id=user, query_text=text, k=10
                    )
                times.append((time.perf_counter() - t0) * 1000)
        print(
            f"  {label:<26} stored={stored:>9,} scope={scope:>8,} {name:<8}"
            f" p50 {percentile(times, 50):6.2f} ms  p99 {percentile(times, 99):6.2f} ms"
        )


async def overlap(
    index: MemoryIndex,
    scope_vecs: npt.NDArray[np.float32],
    scope_ids: list[str],
    qvecs: npt.NDArray[np.float32],
) -> float:
    """Mean share of the float brute-force top-10 that vector_search returns."""
    exact = np.argsort(-(qvecs @ scope_vecs.T), axis=1)[:, :10]
    shares = []
    for i, vec in enumerate(qvecs):
        got = await index.vector_search(
            tenant=TENANT, session_id=SESSION, user_id=USER, query_vector=vec, k=10
        )
        shares.append(len({h.id for h in got} & {scope_ids[j] for j in exact[i]}) / 10)
    return float(np.mean(shares))


async def hit_rate(index: MemoryIndex, queries: list[str], qvecs: npt.NDArray[np.float32]) -> str:
    """Share of sentence probes whose source message is in the top 10, per retriever."""
    found = {"hybrid": 0, "vector": 0, "keyword": 0}
    for text, vec in zip(queries, qvecs, strict=True):
        ranked = {
            "hybrid": await index.search(
                tenant=TENANT,
                session_id=SESSION,
                user_id=USER,
                query_vector=vec,
                query_text=text,
            ),
            "vector": await index.vector_search(
                tenant=TENANT, session_id=SESSION, user_id=USER, query_vector=vec
            ),
            "keyword": await index.keyword_search(
                tenant=TENANT, session_id=SESSION, user_id=USER, query_text=text
            ),
        }
        for name, hits in ranked.items():
            found[name] += any(h.text.startswith(text) for h in hits)
    return ", ".join(f"{name} {n / len(queries):.2f}" for name, n in found.items())


async def run(args: argparse.Namespace) -> None:
    modes = ["message", "exchange"] if args.items == "both" else [args.items]
    for mode in modes:
        print(f"\n== items: {mode} ==")
        await run_one(args, exchange=mode == "exchange")


async def run_one(args: argparse.Namespace, *, exchange: bool) -> None:
    base = Path(args.dir or tempfile.mkdtemp(prefix="veil-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    embedder = Embedder(threads=1)
    maker = TextMaker(7, exchange=exchange)
    n_real = 1000 if args.quick else 3000
    print(
        f"vector candidates per scope: {VECTOR_CANDIDATES}; probe set: {n_real} real sentences"
        " (embedded by all-MiniLM-L6-v2 int8); filler: random unit vectors"
    )
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")

    index = await MemoryIndex.open(base / "memory.sqlite")
    try:
        real_texts = list(dict.fromkeys(maker.message() for _ in range(n_real)))
        t0 = time.perf_counter()
        vecs = await embedder.aembed(real_texts)
        embed_s = time.perf_counter() - t0
        real = records("real", real_texts, user=USER, session=SESSION, start=0)
        t1 = time.perf_counter()
        for i in range(0, len(real), 64):  # the live path: small batches, each with its position
            await index.add(real[i : i + 64], vecs[i : i + 64], checkpoint=i + 64)
        add_s = time.perf_counter() - t1
        print(
            f"ingest with embedding: {len(real) / (embed_s + add_s):,.0f} records/s (embedding"
            f" {len(real) / embed_s:,.0f}/s on one thread, index {len(real) / add_s:,.0f}/s"
            " in batches of 64)"
        )
        chars = sum(map(len, real_texts)) / len(real_texts)
        print(
            f"embedding cost: {embed_s / len(real) * 1e3:.2f} ms a memory of {chars:.0f}"
            f" characters on average ({'an exchange' if exchange else 'a message'})"
        )
        session_texts = [maker.message() for _ in range(50)]
        await index.add(
            records("anon", session_texts, user=None, session=SESSION, start=0),
            await embedder.aembed(session_texts),
        )

        qrng = random.Random(3)
        queries = [
            f"Do you remember what {qrng.choice(_SUBJECTS).lower()} said about"
            f" {qrng.choice(_OBJECTS)}?"
            for _ in range(args.probes // 2)
        ]
        sentences = [
            real_texts[qrng.randrange(len(real_texts))].split(".")[0].split("?")[0]
            for _ in range(args.probes - len(queries))
        ]
        queries += sentences
        qvecs = await embedder.aembed(queries)

        filler = Filler(index, seed=11, exchange=exchange)
        scope_vecs = [vecs]
        scope_ids = [r.id for r in real]
        rng = np.random.default_rng(11)

        async def grow_scope(total: int) -> None:
            need = total - sum(len(v) for v in scope_vecs)
            while need > 0:
                size = min(2000, need)
                texts = [filler.texts.message() for _ in range(size)]
                start = len(scope_ids)
                recs = records(
                    "scope", texts, user=USER, session=f"old-{start // 2000}", start=start
                )
                v = random_units(rng, size, index.dim)
                t = time.perf_counter()
                await index.add(recs, v)
                filler.seconds += time.perf_counter() - t
                filler.rows += size
                scope_vecs.append(v)
                scope_ids.extend(r.id for r in recs)
                need -= size

        for size in (10_000, 100_000):
            await grow_scope(size)
            stored = await index.count()
            await measure(index, queries, qvecs, "single scope", stored, size)
        share = await overlap(index, np.concatenate(scope_vecs), scope_ids, qvecs)
        print(
            "  top-10 overlap, binary candidates + cosine re-rank vs float brute force"
            f" (100k scope): {share:.3f}"
        )
        probe_vecs = qvecs[len(queries) - len(sentences) :]
        print(
            "  source message in top 10 for a sentence taken from it (100k scope): "
            + await hit_rate(index, sentences, probe_vecs)
        )
        if not args.quick:
            await filler.fill(900_000, spread(), batch=1000)
            stored = await index.count()
            await measure(index, queries, qvecs, "1M spread, scope 100k", stored, 100_000)
            light = ("sess-1", "user-1")  # the first owner spread() made: one batch of 1,000
            await measure(index, queries, qvecs, "1M spread, light user", stored, 1_000, light)
        print(
            f"index-only ingestion (precomputed vectors, batches of 1000-2000): "
            f"{filler.rows / filler.seconds:,.0f} rows/s over {filler.rows:,} rows"
        )
        db = base / "memory.sqlite"
        print(f"file size: {db.stat().st_size / 1e6:,.0f} MB for {await index.count():,} memories")
        t0 = time.perf_counter()
        gone = await index.delete_session(TENANT, "old-3", scrub=False)
        t1 = time.perf_counter()
        await index.scrub()
        t2 = time.perf_counter()
        print(
            f"erase a session of {gone:,} memories: rows gone from every table in"
            f" {(t1 - t0) * 1000:.0f} ms; scrub of the file (FTS5 rebuild, VACUUM, WAL"
            f" truncate) {t2 - t1:.1f} s"
        )
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        await index.close()
        embedder.close()
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k and 100k only, fewer probes")
    parser.add_argument("--dir", help="keep the database here instead of a temporary folder")
    parser.add_argument("--probes", type=int, default=0, help="query count (default 100, quick 40)")
    parser.add_argument(
        "--items", choices=("message", "exchange", "both"), default="exchange", help="see above"
    )
    args = parser.parse_args()
    args.probes = args.probes or (40 if args.quick else 100)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
