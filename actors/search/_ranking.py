"""The hybrid index's search: candidates of each side inside the scopes, and their fusion.

Private to `actors.search`; `hybrid.py` describes the method (its docstring's
Vectors, Keywords and Fusion paragraphs).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple

import aiosqlite
import numpy as np
import numpy.typing as npt

from actors.search import _sql as sql

__all__ = [
    "FUSED_HEAD",
    "KEYWORD_TERM_CAP",
    "KEYWORD_WEIGHT",
    "RRF_K",
    "VECTOR_CANDIDATES",
    "ScopeRow",
    "fts_terms",
    "fuse",
    "keyword_candidates",
    "quantize",
    "term_counts",
    "unit",
    "vector_candidates",
]

#: Hamming candidates read per scope before the exact cosine re-rank.
VECTOR_CANDIDATES = 48
#: A query term matching more rows than this in the searched scopes is ignored.
KEYWORD_TERM_CAP = 2000
#: Reciprocal Rank Fusion constant.
RRF_K = 60
#: Candidates of each side that take part in the fusion.
FUSED_HEAD = 10
#: Weight of the keyword side in the fusion (the vector side weighs 1).
KEYWORD_WEIGHT = 0.5

_STOP_WORDS = frozenset(
    """
    a about after again all am an and any are as at be because been before being between
    both but by can could did do does doing don down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its
    itself just let me more most my myself no nor not now of off on once only or other our
    ours ourselves out over own same she should so some such than that the their theirs
    them themselves then there these they this those through to too under until up very was
    we were what when where which while who whom why will with would you your yours
    yourself yourselves s t
    """.split()  # noqa: SIM905 (a word list reads better as text)
)
_WORD = re.compile(r"[^\W_]+")
_MAX_TERMS = 16


class ScopeRow(NamedTuple):
    """A stored scope, as a search reads it."""

    id: int
    tier: int  # index into sql.VEC_TABLES
    size: int  # entries it has received (for IDF)


def quantize(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """Sign bits of each row, packed as sqlite-vec's `vec_quantize_binary` packs them."""
    return np.packbits(np.asarray(vectors) > 0, axis=-1, bitorder="little")


def fts_terms(text: str) -> list[str]:
    """Query words as FTS5 tokenizes them (lower case, no diacritics), minus stop words."""
    folded = unicodedata.normalize("NFKD", text.lower())
    folded = "".join(ch for ch in folded if not unicodedata.combining(ch))
    terms: list[str] = []
    for word in _WORD.findall(folded):
        if word not in _STOP_WORDS and word not in terms:
            terms.append(word)
    return terms[:_MAX_TERMS]


def unit(vectors: npt.ArrayLike, dim: int) -> npt.NDArray[np.float32]:
    """Rows scaled to length 1; raises ValueError on a wrong shape, a zero or a non-finite."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"expected vectors of {dim} floats, got shape {arr.shape}")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if not np.all(np.isfinite(arr)) or np.any(norms == 0):
        raise ValueError("vectors must be finite and non-zero")
    return np.ascontiguousarray(arr / norms, dtype=np.float32)


async def vector_candidates(
    db: aiosqlite.Connection,
    scopes: Sequence[ScopeRow],
    q: npt.NDArray[np.float32],
    pool: int,
    kinds: Collection[str] | None,
) -> list[tuple[int, float]]:
    """(rowid, cosine) best first: hamming KNN per scope, re-ranked on float vectors.

    `q` is the query as a unit vector.
    """
    # A kind filter applies after the KNN, so read deeper to still fill the pool.
    per_scope = max(VECTOR_CANDIDATES, pool) * (4 if kinds else 1)
    knn = " UNION ALL ".join(
        f"SELECT rowid FROM {sql.VEC_TABLES[scope.tier][0]}"
        f" WHERE bits MATCH vec_bit(?1) AND k = ?2 AND scope = ?{3 + i}"
        for i, scope in enumerate(scopes)
    )
    query = f"SELECT v.rid, v.vector FROM ({knn}) c JOIN memory_vectors v ON v.rid = c.rowid"
    args: list[Any] = [quantize(q).tobytes(), per_scope, *(scope.id for scope in scopes)]
    if kinds:
        marks = ",".join(f"?{3 + len(scopes) + j}" for j in range(len(kinds)))
        query += f" JOIN memories m ON m.rid = c.rowid WHERE m.kind IN ({marks})"
        args.extend(sorted(kinds))
    rows = list(await db.execute_fetchall(query, args))
    if not rows:
        return []
    rids = np.array([int(r[0]) for r in rows], dtype=np.int64)
    mat = np.frombuffer(b"".join(bytes(r[1]) for r in rows), dtype=np.float32)
    sims = mat.reshape(len(rows), len(q)) @ q
    order = np.argsort(-sims, kind="stable")[:pool]
    return [(int(rids[i]), float(sims[i])) for i in order]


async def term_counts(
    db: aiosqlite.Connection, scopes: Sequence[ScopeRow], terms: Sequence[str]
) -> dict[str, int]:
    """How many entries of these scopes hold each term (`fts_terms` words), in one query."""
    if not terms or not scopes:
        return dict.fromkeys(terms, 0)
    ranges = [sql.bounds(s.id) for s in scopes]
    in_scopes = "+".join(
        "(SELECT count(*) FROM memory_fts WHERE memory_fts MATCH ? AND rowid BETWEEN ? AND ?)"
        for _ in scopes
    )
    rows = await db.execute_fetchall(
        "SELECT " + ", ".join(f"({in_scopes})" for _ in terms),
        [v for t in terms for lo, hi in ranges for v in (f'"{t}"', lo, hi)],
    )
    return dict(zip(terms, (int(c) for c in next(iter(rows))), strict=True))


async def keyword_candidates(
    db: aiosqlite.Connection,
    scopes: Sequence[ScopeRow],
    query_text: str,
    pool: int,
    kinds: Collection[str] | None,
    common: tuple[float, int] | None = None,
) -> list[tuple[int, float]]:
    """(rowid, BM25) best first, with the searched scopes' own statistics.

    With `common` (share, least): once the scopes have received `least` entries, a term
    that at least `share` of them hold is left out, and a query of such terms alone
    finds nothing. Such a term scores next to nothing, yet every entry it matches would
    still get a rank, by recency, that fusion reads as a keyword match.
    """
    terms = fts_terms(query_text)
    if not terms:
        return []
    ranges = [sql.bounds(s.id) for s in scopes]
    df = await term_counts(db, scopes, terms)
    total = sum(s.size for s in scopes)
    if common is not None and total >= max(1, common[1]):
        terms = [t for t in terms if df[t] < common[0] * total]
    # Rarest first, while the rows to read stay under the cap; a query of common
    # words only keeps its rarest one, read over its newest matches.
    kept: list[str] = []
    budget = KEYWORD_TERM_CAP
    for t in sorted((t for t in terms if df[t] > 0), key=lambda t: df[t]):
        if df[t] <= budget or not kept:
            kept.append(t)
            budget -= df[t]
    if not kept:
        return []
    arms, args = [], []
    for i, t in enumerate(kept):
        for lo, hi in ranges:
            arms.append(
                f"SELECT * FROM (SELECT {i} AS t, f.rowid AS rid FROM memory_fts f"
                + (" JOIN memories m ON m.rid = f.rowid" if kinds else "")
                + " WHERE memory_fts MATCH ? AND f.rowid BETWEEN ? AND ?"
                + (f" AND m.kind IN ({sql.marks(len(kinds))})" if kinds else "")
                + f" ORDER BY f.rowid DESC LIMIT {KEYWORD_TERM_CAP})"
            )
            args += [f'"{t}"', lo, hi, *sorted(kinds or ())]
    # BM25 where a term counts once per entry (they are short) and length is not
    # normalised (b = 0); IDF from the scopes searched, so no other scope's text
    # weighs on the ranking and no query pays for the size of the whole index.
    idf = [math.log(1 + (total - df[t] + 0.5) / (df[t] + 0.5)) for t in kept]
    score: dict[int, float] = {}
    for t, rid in await db.execute_fetchall(" UNION ALL ".join(arms), args):
        score[int(rid)] = score.get(int(rid), 0.0) + idf[int(t)]
    best = sorted(score.items(), key=lambda item: (-item[1], -item[0]))
    return best[:pool]


def fuse(
    vec: list[tuple[int, float]],
    kw: list[tuple[int, float]],
    k: int,
    *,
    head: int = FUSED_HEAD,
    keyword_weight: float = KEYWORD_WEIGHT,
) -> tuple[list[int], dict[int, float]]:
    """The best k rowids by weighted reciprocal rank, and every fused score."""
    # Fuse only each side's head: with whole candidate pools, anything both sides
    # found (any shared common word) outranked every paraphrase found by meaning
    # alone. Keywords weigh half: they confirm more than they discover.
    # (bench/memory_eval.py: recall@5 0.818 -> 0.905 on its 137 questions.)
    head = max(k, head)
    fused: dict[int, float] = {}
    for ranking, weight in ((vec[:head], 1.0), (kw[:head], keyword_weight)):
        for rank, (rid, _) in enumerate(ranking, 1):
            fused[rid] = fused.get(rid, 0.0) + weight / (RRF_K + rank)
    sims = dict(vec)
    best = sorted(fused, key=lambda rid: (-fused[rid], -sims.get(rid, -2.0), rid))[:k]
    return best, fused
