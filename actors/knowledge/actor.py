"""The knowledge actor: answers `knowledge.search` from the index, kept current with KB_EVENTS.

It runs beside the memory actor (the process that holds the data directory's
index lock), catches each collection up with its log before searching it, so
documents added by `veil kb add` anywhere are found on the next turn.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
from nats.aio.client import Client

from actors.knowledge.index import KnowledgeIndex
from actors.knowledge.ingest import collections, ingest, remove
from actors.knowledge.log import KnowledgeLog
from actors.knowledge.parse import UnsupportedFile
from bus import telemetry
from bus.requests import nats_request
from bus.service import Endpoint, TypedService, start_service
from bus.subjects import KNOWLEDGE_ADMIN, KNOWLEDGE_SEARCH, validate_id
from contracts.knowledge import (
    ADMIN_CODEC,
    ADMIN_REPLY_CODEC,
    SEARCH_CODEC,
    SEARCH_REPLY_CODEC,
    AdminReply,
    AdminRequest,
    KnowledgeFound,
    KnowledgeHit,
    KnowledgeSearch,
)

__all__ = [
    "KnowledgeActor",
    "ask_knowledge",
]


async def ask_knowledge(nc: Client, ask: KnowledgeSearch, timeout: float) -> list[KnowledgeHit]:
    """Search through the knowledge actor; NATS and decode errors are the caller's to read."""
    reply = await nats_request(
        nc,
        KNOWLEDGE_SEARCH,
        SEARCH_CODEC.encode(ask),
        timeout=timeout,
        headers=telemetry.outgoing(),
    )
    return SEARCH_REPLY_CODEC.decode(reply.data).hits


class KnowledgeActor:
    def __init__(
        self, nc: Client, index: KnowledgeIndex, *, version: str, uploads: Path | None = None
    ) -> None:
        self._nc = nc
        self._index = index
        # Uploaded files are kept here: a document's path must keep naming it.
        self._uploads = uploads
        self._log = KnowledgeLog.of(nc)
        self._version = version
        self._service: TypedService | None = None

    async def start(self) -> None:
        await self._log.ensure()
        search = Endpoint(
            name="search",
            subject=KNOWLEDGE_SEARCH,
            request=SEARCH_CODEC,
            reply=SEARCH_REPLY_CODEC,
            handle=self._search,
        )
        admin = Endpoint(
            name="admin",
            subject=KNOWLEDGE_ADMIN,
            request=ADMIN_CODEC,
            reply=ADMIN_REPLY_CODEC,
            handle=self._admin,
            # Admin replies carry their own status: the gateway turns them into HTTP.
            refuse=lambda reason: AdminReply(ok=False, status=400, error=reason),
        )
        self._service = await start_service(
            self._nc,
            name="veil-knowledge",
            version=self._version,
            description="Searches knowledge collections",
            endpoints=[search, admin],
        )

    async def _admin(self, ask: AdminRequest) -> AdminReply:
        try:
            return await self._administer(ask)
        except (FileNotFoundError, UnsupportedFile, ValueError) as error:
            return AdminReply(ok=False, status=400, error=str(error))

    async def _administer(self, ask: AdminRequest) -> AdminReply:
        if ask.action == "list":
            return AdminReply(result=msgspec.to_builtins(await collections(self._nc)))
        collection = validate_id(ask.collection or "", "collection")
        if ask.action == "documents":
            await self._index.sync(self._log, collection)
            return AdminReply(result=msgspec.to_builtins(await self._index.documents(collection)))
        if ask.action == "add":
            if self._uploads is None or not ask.filename or ask.data is None:
                return AdminReply(
                    ok=False, status=400, error="an upload needs a file name and content"
                )
            name = Path(ask.filename).name
            if not name or name.startswith("."):
                return AdminReply(ok=False, status=400, error=f"bad file name {ask.filename!r}")
            folder = self._uploads / collection
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / name
            target.write_bytes(ask.data)
            report = await ingest(self._nc, self._index, collection, [target])
            return AdminReply(result=msgspec.to_builtins(report))
        if ask.action == "remove":
            if not ask.path:
                return AdminReply(ok=False, status=400, error="give the document's path")
            report = await remove(self._nc, self._index, collection, [ask.path])
            if not report.removed:
                return AdminReply(
                    ok=False, status=404, error=f"no document {ask.path!r} in {collection!r}"
                )
            return AdminReply(result=msgspec.to_builtins(report))
        return AdminReply(ok=False, status=400, error=f"unknown action {ask.action!r}")

    async def _search(self, ask: KnowledgeSearch) -> KnowledgeFound:
        # The GenAI conventions' retrieval span.
        with telemetry.span("retrieval veil-knowledge", kind=telemetry.SpanKind.SERVER) as span:
            for collection in ask.collections:
                await self._index.sync(self._log, collection)
            hits = await self._index.search(
                ask.collections, ask.query, k=ask.k, threshold=ask.threshold
            )
            if span is not None:
                span.set_attributes(
                    {
                        "gen_ai.operation.name": "retrieval",
                        "gen_ai.provider.name": "veil",
                        "gen_ai.data_source.id": ",".join(ask.collections),
                        "veil.knowledge.hits": len(hits),
                    }
                )
            return KnowledgeFound(hits=hits)

    async def stop(self) -> None:
        if self._service is not None:
            await self._service.stop()
