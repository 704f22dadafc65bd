"""Long-term memory: recall for a turn (`memory.recall`), forgetting a deleted session
(`memory.forget`), and the hit every side of memory search shares."""

from __future__ import annotations

from datetime import datetime

import msgspec

from bus.codec import Codec

__all__ = [
    "FORGET_CODEC",
    "FORGOTTEN_CODEC",
    "RECALL_CODEC",
    "RECALL_REPLY_CODEC",
    "ForgetRequest",
    "Forgotten",
    "MemoryHit",
    "RecallReply",
    "RecallRequest",
]


class MemoryHit(msgspec.Struct, frozen=True, kw_only=True):
    """A recalled memory and how each retriever ranked it.

    `score` is the fused RRF score for `search`, the cosine for `vector_search`, the
    BM25 score for `keyword_search`; ranks are 1-based, None where that side missed it.
    """

    id: str
    session_id: str
    user_id: str | None
    kind: str
    role: str
    text: str
    source_seq: int
    created_at: datetime
    score: float
    vector_rank: int | None = None
    vector_similarity: float | None = None
    keyword_rank: int | None = None
    bm25: float | None = None


class RecallRequest(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    session_id: str
    user_id: str | None = None
    query: str
    k: int = 8
    # "hybrid" (the product), or "vector" / "keyword" for comparisons.
    mode: str = "hybrid"


class RecallReply(msgspec.Struct, frozen=True, kw_only=True):
    hits: list[MemoryHit]
    # The log position the index had applied when it answered.
    checkpoint: int


class ForgetRequest(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    session_id: str


class Forgotten(msgspec.Struct, frozen=True, kw_only=True):
    """How many memories of the session were erased."""

    deleted: int


RECALL_CODEC: Codec[RecallRequest] = Codec(RecallRequest)
RECALL_REPLY_CODEC: Codec[RecallReply] = Codec(RecallReply)
FORGET_CODEC: Codec[ForgetRequest] = Codec(ForgetRequest)
FORGOTTEN_CODEC: Codec[Forgotten] = Codec(Forgotten)
