"""Deleting a session: its events, its memories, and a tombstone that outlives them.

Reads (metadata, messages, memory search) never enter the mailbox: see
actors/session_front.py.
"""

from __future__ import annotations

import msgspec
import structlog
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.micro.request import Request

from actors import session
from actors._session_common import SessionPart, _not_found
from bus.codec import encode
from bus.requests import nats_request
from bus.subjects import (
    MEMORY_FORGET,
)
from contracts.session import TURN_REPLY_CODEC, DeleteSession, SessionDeleted
from eventstore.tombstones import Tombstone

__all__ = ["SessionQueries"]

log = structlog.get_logger("veil.session")


class SessionQueries(SessionPart):
    """Mixed into SessionActor: deleting the session."""

    def _owned_by(self, tenant: str) -> bool:
        return self._state.session_id is not None and self._state.tenant == tenant

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
