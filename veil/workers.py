"""The worker role: session actors, model actors, memory, router and tools on one connection.

Only `veil serve` and `veil worker` import this: a gateway process never loads the
actors, their models or their indexes.
"""

from __future__ import annotations

import contextlib

from nats.aio.client import Client
from prometheus_client import CollectorRegistry

from actors.engines import Engine, build_engine
from actors.leases import Leases
from actors.memory.actor import MemoryActor
from actors.memory.embedder import default_embedder
from actors.metrics import WorkerMetrics
from actors.model_actor import ModelActor
from actors.router_actor import RouterActor, build_routers
from actors.session_actor import SessionActor, SessionContext
from actors.session_front import SessionFront
from actors.tools.actor import ToolActor, configured_tools
from bus.connection import connect
from bus.placement import Membership
from bus.runtime import ActorHost
from bus.signals import Signals
from bus.subjects import (
    PARTITIONS,
    PLACEMENT_SESSIONS,
    SESSION_CANCEL_WILDCARD,
    SESSION_CMD_WILDCARD,
    session_key_from_cmd_subject,
    session_partition_wildcard,
)
from config import Config
from eventstore.jetstream import JetStreamEventStore, ensure_stream
from eventstore.snapshots import JetStreamSnapshotStore
from eventstore.tombstones import TombstoneLog
from veil import __version__
from veil.memory_role import MemoryHandle, start_memory
from veil.roles import ROLES
from veil.usage_role import UsageHandle, start_usage

__all__ = ["Workers"]


class Workers:
    """The actors of one worker process: those of its roles (all by default)."""

    def __init__(
        self,
        config: Config,
        nats_url: str,
        registry: CollectorRegistry | None = None,
        roles: frozenset[str] = frozenset(ROLES),
    ) -> None:
        self._config = config
        self._url = nats_url
        self.roles = roles
        # The process's metrics registry (veil/telemetry.py), else one of its own.
        self.metrics = WorkerMetrics(registry or CollectorRegistry())
        self._nc: Client | None = None
        self._sessions: ActorHost | None = None
        self._models: ModelActor | None = None
        self._memory: MemoryHandle | None = None
        self._usage: UsageHandle | None = None
        self._router: RouterActor | None = None
        self._tools: ToolActor | None = None
        self._leases: Leases | None = None
        self._placement: Membership | None = None
        self.signals: Signals | None = None

    async def start(self) -> None:
        nc = self._nc = await connect(self._url, name="veil-worker")
        js = nc.jetstream()
        await ensure_stream(js)
        tombstones = TombstoneLog(js, nc)
        await tombstones.ensure()
        snapshot_store = await JetStreamSnapshotStore.open(js)
        signals = self.signals = Signals(nc, SESSION_CANCEL_WILDCARD)
        await signals.start()
        leases = self._leases = Leases(nc)
        await leases.start()
        ctx = SessionContext(
            metrics=self.metrics,
            nc=nc,
            signals=signals,
            leases=leases,
            store=JetStreamEventStore(js, nc),
            config=self._config,
            tombstones=tombstones,
            snapshots=snapshot_store,
            tools=configured_tools(self._config),
        )
        if "sessions" in self.roles:
            await self._start_sessions(ctx)
        if "memory" in self.roles:
            self._memory = await start_memory(self._config, nc, js, ctx.store, tombstones)
            if self.memory is not None:
                self.metrics.watch_memory(self.memory.stats)
        if "usage" in self.roles:
            self._usage = await start_usage(self._config, nc, js, ctx.store)
        if "models" in self.roles:
            engines: dict[str, Engine] = {
                name: build_engine(self._config, name) for name in self._config.engines
            }
            self._models = ModelActor(
                nc, engines, version=__version__, signals=signals, metrics=self.metrics
            )
            await self._models.start()

    async def _start_sessions(self, ctx: SessionContext) -> None:
        """The session actors, and the router and tools only they ask."""
        nc = ctx.nc
        front = SessionFront(ctx)
        self._sessions = ActorHost(
            nc,
            service="veil-session",
            version=__version__,
            description="Session actors: one writer per chat session",
            endpoint="cmd",
            subject=SESSION_CMD_WILDCARD,
            # One actor per session_key: a tenant and a session id.
            key_of=session_key_from_cmd_subject,
            factory=lambda key: SessionActor(key, ctx),
            idle_seconds=self._config.server.actor_idle,
            screen=front.screen,
            max_queued=self._config.server.max_queued_per_session,
            max_in_flight=self._config.server.max_turns_in_flight,
            overloaded=front.overloaded,
        )
        front.attach(self._sessions)
        await self._sessions.start()
        # The partitions of session commands this worker serves (bus/placement.py); the
        # endpoint above serves every session too, for commands no partition took.
        sessions = self._sessions
        self._placement = Membership(
            nc,
            PLACEMENT_SESSIONS,
            ctx.leases.worker_id,
            PARTITIONS,
            lambda owned: sessions.serve_placed({session_partition_wildcard(p) for p in owned}),
        )
        await self._placement.start()
        self.metrics.watch_actors(
            "veil-session", lambda: self.sessions.active, self.sessions.mailbox_depths
        )
        routers = build_routers(self._config, default_embedder(), nc)
        if routers:
            self._router = RouterActor(nc, routers, version=__version__)
            await self._router.start()
        if any(p.tools for p in self._config.pipelines.values()):
            self._tools = ToolActor(nc, configured_tools(self._config), version=__version__)
            await self._tools.start()

    @property
    def nc(self) -> Client:
        assert self._nc is not None
        return self._nc

    @property
    def sessions(self) -> ActorHost:
        """The session actors' host (how many are active, for operators and tests)."""
        assert self._sessions is not None
        return self._sessions

    @property
    def placement(self) -> Membership:
        """This worker's place among the session workers (which partitions it serves)."""
        assert self._placement is not None
        return self._placement

    @property
    def memory(self) -> MemoryActor | None:
        return self._memory.actor if self._memory is not None else None

    async def stop(self) -> None:
        if self._placement is not None:
            # Its partitions move to the others at once, before its actors stop.
            await self._placement.stop()
        if self._sessions is not None:
            await self._sessions.stop()
        if self._leases is not None:
            await self._leases.stop()
        if self._models is not None:
            await self._models.stop()
        if self._memory is not None:
            await self._memory.stop()
        if self._usage is not None:
            await self._usage.stop()
        if self._router is not None:
            await self._router.stop()
        if self._tools is not None:
            await self._tools.stop()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
