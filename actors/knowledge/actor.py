"""The knowledge actor: answers `knowledge.search` from the index, kept current with KB_EVENTS.

It runs beside the memory actor (the process that holds the data directory's
index lock), catches each collection up with its log before searching it, so
documents added by `veil kb add` anywhere are found on the next turn.
"""

from __future__ import annotations

import contextlib

import msgspec
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from actors.knowledge.index import KnowledgeHit, KnowledgeIndex
from actors.knowledge.log import KnowledgeLog
from bus.codec import Codec, DecodeError

__all__ = ["KNOWLEDGE_SEARCH", "SEARCH_CODEC", "SEARCH_REPLY_CODEC", "KnowledgeActor", "KnowledgeSearch", "KnowledgeFound"]

KNOWLEDGE_SEARCH = "knowledge.search"


class KnowledgeSearch(msgspec.Struct, frozen=True, kw_only=True):
    collections: list[str]
    query: str
    k: int = 5
    threshold: float | None = None


class KnowledgeFound(msgspec.Struct, frozen=True, kw_only=True):
    hits: list[KnowledgeHit]


SEARCH_CODEC: Codec[KnowledgeSearch] = Codec(KnowledgeSearch)
SEARCH_REPLY_CODEC: Codec[KnowledgeFound] = Codec(KnowledgeFound)


class KnowledgeActor:
    def __init__(self, nc: Client, index: KnowledgeIndex, *, version: str) -> None:
        self._nc = nc
        self._index = index
        self._log = KnowledgeLog.of(nc)
        self._version = version
        self._service: Service | None = None

    async def start(self) -> None:
        await self._log.ensure()
        self._service = await add_service(
            self._nc, name="veil-knowledge", version=self._version, description="Searches knowledge collections"
        )
        await self._service.add_endpoint(name="search", subject=KNOWLEDGE_SEARCH, handler=self._search)

    async def _search(self, request: Request) -> None:
        try:
            ask = SEARCH_CODEC.decode(request.data)
        except DecodeError as error:
            await request.respond_error("400", str(error))
            return
        for collection in ask.collections:
            await self._index.sync(self._log, collection)
        hits = await self._index.search(ask.collections, ask.query, k=ask.k, threshold=ask.threshold)
        await request.respond(SEARCH_REPLY_CODEC.encode(KnowledgeFound(hits=hits)))

    async def stop(self) -> None:
        if self._service is not None:
            with contextlib.suppress(Exception):
                await self._service.stop()
