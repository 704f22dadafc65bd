"""`veil serve --workers N`: the worker processes beside the gateway, started and stopped with it.

The gateway stays in the parent (it owns the port, the embedded nats-server and the
signals; it is light next to the actors). The parent spawns N `veil worker --roles
sessions,models` children that serve turns, and one `veil worker --roles memory,usage`
that owns the indexes, so that embedding never takes a core from a turn. Each child has
its own NATS connection; NATS spreads the turns over them (queue groups).

A child that exits while Veil runs is logged and started again after a delay that grows
while it keeps dying (a child that ran for a while starts the count over). Children run
in their own process group, so a Ctrl-C reaches the parent only, which stops them in
order: the gateway drains first, then the children get SIGTERM, then nats-server stops
last. A parent killed outright takes them along (PR_SET_PDEATHSIG, as for nats-server).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence

import structlog

__all__ = ["RESTART_DELAYS", "WorkerPool", "default_workers", "worker_commands"]

log = structlog.get_logger("veil.supervisor")

# Seconds before a child that exited is started again, one step further each time it
# dies again within STABLE_SECONDS of its start.
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_SECONDS = 60.0
# What a worker prints when its actors are listening (veil/server.py).
READY_LINE = "Workers ready"
# Seconds a child has to say it is ready, and to stop after SIGTERM before SIGKILL.
START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0

TURN_ROLES = "sessions,models"
INDEX_ROLES = "memory,usage"


def default_workers() -> int:
    """`--workers auto`: one turn worker per core the process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def worker_commands(workers: int, extra_args: Sequence[str] = ()) -> list[tuple[str, list[str]]]:
    """(name, argv) of each child: `workers` turn workers and one index worker."""
    base = [sys.executable, "-m", "veil.cli", "worker", *extra_args]
    turn = [(f"worker-{i + 1}", [*base, "--roles", TURN_ROLES]) for i in range(workers)]
    return [*turn, ("memory", [*base, "--roles", INDEX_ROLES])]


def _die_with_parent() -> None:
    """Linux: SIGTERM the child if the parent dies without stopping it."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Child:
    """One slot of the pool: its command, the running process, its restarts."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.restarts = 0

    async def spawn(self) -> asyncio.subprocess.Process:
        self.ready.clear()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 20,  # a line longer than asyncio's 64 KiB default ends the pump
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        log.info("worker.started", worker=self.name, pid=self.proc.pid)
        return self.proc

    async def pump(self, proc: asyncio.subprocess.Process) -> None:
        """Its stdout onto ours, line by line; the ready line sets `ready`."""
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if READY_LINE in line:
                self.ready.set()
            print(f"[{self.name}] {line}", flush=True)


class WorkerPool:
    """The worker children of `veil serve --workers N`: started together, kept running,
    stopped together."""

    def __init__(self, commands: list[tuple[str, list[str]]], nats_url: str) -> None:
        env = {**os.environ, "VEIL_NATS_URL": nats_url, "PYTHONUNBUFFERED": "1"}
        self._children = [_Child(name, argv, env) for name, argv in commands]
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def pids(self) -> dict[str, int]:
        """The running children's pids by name."""
        return {
            c.name: c.proc.pid
            for c in self._children
            if c.proc is not None and c.proc.returncode is None
        }

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        """Spawn every child and wait until each says it is ready."""
        self._tasks = [asyncio.create_task(self._keep(c)) for c in self._children]
        waits = [asyncio.create_task(c.ready.wait()) for c in self._children]
        _, pending = await asyncio.wait(waits, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            late = [c.name for c in self._children if not c.ready.is_set()]
            raise RuntimeError(f"workers not ready after {timeout:.0f} s: {', '.join(late)}")

    async def _keep(self, child: _Child) -> None:
        """Run the child, and again whenever it exits while the pool runs."""
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            try:
                proc = await child.spawn()
            except OSError as error:  # out of processes or memory: try again later
                code: int | str = repr(error)
                pid = None
            else:
                if self._stopping:  # stop() began while it started: it missed this one
                    proc.send_signal(signal.SIGTERM)
                await child.pump(proc)
                code, pid = await proc.wait(), proc.pid
            if self._stopping:
                return
            if time.monotonic() - started > STABLE_SECONDS:
                failures = 0
            delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
            failures += 1
            child.restarts += 1
            log.error("worker.exited", worker=child.name, pid=pid, code=code, restart_in=delay)
            await asyncio.sleep(delay)
            if not self._stopping:
                log.warning("worker.restarting", worker=child.name, restarts=child.restarts)

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM every child (they drain), SIGKILL those still running after timeout."""
        self._stopping = True
        running = [c.proc for c in self._children if c.proc is not None]
        for proc in running:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in running:
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning("worker.killed", pid=proc.pid, seconds=timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
