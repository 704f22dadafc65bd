"""What leaving a scope's common words out of recall's query costs, at 10k and 100k memories.

`MemoryIndex.semantic_query` (the words half the searched memories hold, left out of
what recall embeds) runs before the query is embedded, so it adds to recall; the
keyword side of `MemoryIndex.search` leaves the same words out. This times, on the
scope `bench/memory_recall.py` builds (its synthetic exchanges: 1,000 embedded by the
real model, the rest with random unit vectors; its probe questions), in one run:
`search` as before (the index searched with `common` off, as it was), `search` as
now, and `semantic_query` + `search` (what recall now does besides embedding).

    python bench/memory_query_latency.py
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_recall import (
    _OBJECTS,
    _SUBJECTS,
    SESSION,
    TENANT,
    USER,
    TextMaker,
    random_units,
    records,
)

from actors.memory.embedder import Embedder
from actors.memory.index import FUSED_HEAD, KEYWORD_WEIGHT, MemoryIndex, _scopes
from bench._stats import percentile


async def timed(run: Callable[[int], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(2):
        for i in range(n):
            t0 = time.perf_counter()
            await run(i)
            out.append((time.perf_counter() - t0) * 1e3)
    return out


async def main() -> None:
    embedder = Embedder(threads=1)
    maker = TextMaker(7, exchange=True)
    with tempfile.TemporaryDirectory(prefix="veil-qlat-") as tmp:
        index = await MemoryIndex.open(Path(tmp) / "memory.sqlite")
        try:
            texts = list(dict.fromkeys(maker.message() for _ in range(1000)))
            await index.add(
                records("real", texts, user=USER, session=SESSION, start=0),
                await embedder.aembed(texts),
            )
            qrng = random.Random(3)
            queries = [
                f"Do you remember what {qrng.choice(_SUBJECTS).lower()} said about"
                f" {qrng.choice(_OBJECTS)}?"
                for _ in range(20)
            ] + [texts[qrng.randrange(len(texts))].split(".")[0] for _ in range(20)]
            qvecs = await embedder.aembed(queries)
            rng = np.random.default_rng(11)
            have = len(texts)
            scopes = _scopes(TENANT, SESSION, USER)
            args = {"tenant": TENANT, "session_id": SESSION, "user_id": USER}
            for size in (10_000, 100_000):
                while have < size:
                    n = min(2000, size - have)
                    filler = [maker.message() for _ in range(n)]
                    recs = records("scope", filler, user=USER, session=f"old-{have}", start=have)
                    await index.add(recs, random_units(rng, n, index.dim))
                    have += n

                async def before(i: int) -> object:
                    return await index.store.search(
                        scopes,
                        query_vector=qvecs[i],
                        query_text=queries[i],
                        k=10,
                        head=FUSED_HEAD,
                        keyword_weight=KEYWORD_WEIGHT,
                    )

                async def now(i: int) -> object:
                    return await index.search(
                        **args, query_vector=qvecs[i], query_text=queries[i], k=10
                    )

                async def semantic(i: int) -> object:
                    return await index.semantic_query(**args, query_text=queries[i])

                async def both(i: int) -> object:
                    await semantic(i)
                    return await now(i)

                changed = sum(
                    [await index.semantic_query(**args, query_text=q) != q for q in queries]
                )
                for name, run in (
                    ("search, before", before),
                    ("search, now", now),
                    ("semantic_query", semantic),
                    ("semantic_query + search", both),
                ):
                    ms = await timed(run, len(queries))
                    print(
                        f"scope {size:>7,}  {name:<24} p50 {percentile(ms, 50):6.2f} ms"
                        f"  p99 {percentile(ms, 99):6.2f} ms"
                    )
                print(f"  queries with words left out: {changed} of {len(queries)}")
        finally:
            await index.close()
            embedder.close()


if __name__ == "__main__":
    asyncio.run(main())
