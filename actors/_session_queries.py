"""A session's answers to its owner: metadata, memory search, deletion."""

from __future__ import annotations

import msgspec
import structlog
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.micro.request import Request

from actors import session
from actors._session_common import SessionPart, _error, _not_found
from actors.memory.actor import RecallRequest, ask_recall
from actors.protocol import (
    TURN_REPLY_CODEC,
    DeleteSession,
    GetSession,
    MemoriesFound,
    MemoryFound,
    SearchMemories,
    SessionDeleted,
    SessionView,
)
from bus.codec import encode
from bus.requests import nats_request
from bus.subjects import (
    MEMORY_FORGET,
)
from eventstore.tombstones import Tombstone

__all__ = ["SessionQueries"]

log = structlog.get_logger("veil.session")


class SessionQueries(SessionPart):
    """Mixed into SessionActor: requests about the session rather than a turn."""

    def _owned_by(self, tenant: str) -> bool:
        return self._state.session_id is not None and self._state.tenant == tenant

    async def _get(self, request: Request, command: GetSession) -> None:
        await self._reload()  # another worker may have moved it on
        state = self._state
        if not self._owned_by(command.tenant):
            await self._reject(request, _not_found(self.session_id))
            return
        assert state.created_at is not None and state.updated_at is not None
        view = SessionView(
            session_id=self.session_id,
            created_at=state.created_at,
            updated_at=state.updated_at,
            turns=state.turns,
            usage=state.usage,
            model=state.open_turn.model if state.open_turn else state.last_model,
            messages=list(state.history) if command.messages else None,
        )
        await request.respond(TURN_REPLY_CODEC.encode(view))

    async def _search(self, request: Request, command: SearchMemories) -> None:
        await self._reload()
        if not self._owned_by(command.tenant):
            await self._reject(request, _not_found(self.session_id))
            return
        ask = RecallRequest(
            tenant=command.tenant,
            session_id=self.session_id,
            user_id=self._state.user_id,
            query=command.query,
            k=command.k,
        )
        try:
            found = await ask_recall(self._ctx.nc, ask, timeout=10)
        except NoRespondersError:
            await self._reject(
                request, _error(503, "memory_unavailable", "Long-term memory is not running.")
            )
            return
        except NatsTimeout:
            await self._reject(
                request, _error(504, "timeout", "Long-term memory did not answer in time.")
            )
            return
        hits = [
            MemoryFound(
                id=h.id,
                session_id=h.session_id,
                role=h.role,
                kind=h.kind,
                text=h.text,
                score=h.score,
                created_at=h.created_at,
                vector_similarity=h.vector_similarity,
                bm25=h.bm25,
            )
            for h in found
        ]
        await request.respond(TURN_REPLY_CODEC.encode(MemoriesFound(hits=hits)))

    async def _delete(self, request: Request, command: DeleteSession) -> None:
        await self._reload()
        if not self._owned_by(command.tenant):
            await self._reject(request, _not_found(self.session_id))
            return
        # The tombstone first: if we stop halfway, the next activation finishes the job.
        if self._ctx.tombstones is not None:
            await self._ctx.tombstones.record(
                Tombstone(
                    session_id=self.session_id,
                    tenant=command.tenant,
                    deleted_by=command.key_id,
                    at=self._ctx.clock(),
                )
            )
        erased = await self._ctx.store.erase(self.session_id)
        memories = await self._forget_memories(command.tenant)
        self._state = session.initial()
        self._last_seq = 0
        self._erased = True
        log.info("session.deleted", session=self.session_id, events=erased, memories=memories)
        reply = SessionDeleted(
            session_id=self.session_id, events_erased=erased, memories_erased=memories
        )
        await request.respond(TURN_REPLY_CODEC.encode(reply))

    async def _forget_memories(self, tenant: str) -> int:
        """Ask the memory actor to drop the session's rows now; its tombstone check covers outages."""
        body = encode({"tenant": tenant, "session_id": self.session_id})
        try:
            reply = await nats_request(self._ctx.nc, MEMORY_FORGET, body, timeout=10)
        except (NoRespondersError, NatsTimeout):
            return 0
        count = msgspec.json.decode(reply.data).get("deleted", 0)
        return int(count)
