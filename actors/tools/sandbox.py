"""Run plain-function tools in worker processes that a timeout or a cancellation kills.

A thread cannot be stopped, and one big-integer operation holds the GIL from start to end:
the calculator's `((9**1000)**1000)**8` ran 13.9 s in a thread and the server's health check
stalled 13.8 s with it. A worker process (actors/tools/worker.py) holds neither the event loop
nor the GIL, and SIGKILL stops it whatever it is doing.

A worker serves one call at a time: one JSON line in, a `Taken` line back before the tool runs,
then `Returned` or `Raised`. A worker that dies before `Taken` never ran the tool, so the call
moves to a fresh worker (an idle one may have been killed from outside); one that dies after it
is the tool's failure, and the tool is never run twice.

Measured on 2 cores (bench script not kept): the calculator through a warm worker takes 77 us
(median; 94 us on uvloop) against 11 us called directly and 82 us through asyncio.to_thread,
the path it replaces; starting a worker takes about 100 ms, paid on first use and after a kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from types import TracebackType
from typing import Self

import msgspec

from actors.tools.builtin import ToolError
from actors.tools.worker import Call, Raised, Returned, Taken

__all__ = ["DEFAULT_SIZE", "ToolFailed", "WorkerPool"]

# Calls beyond it wait for a worker, within their own timeout: CPU-bound tools gain nothing
# from more processes than cores, and each worker holds about 20 MB.
DEFAULT_SIZE = max(2, min(8, os.cpu_count() or 2))
# A reply is cut to the caller's max_chars in the worker; JSON may escape a character to 6 bytes.
_LINE_LIMIT = 1 << 20
_ENCODE = msgspec.json.Encoder()
_TAKEN = _ENCODE.encode(Taken()) + b"\n"
_DECODE: msgspec.json.Decoder[Taken | Returned | Raised] = msgspec.json.Decoder(
    Taken | Returned | Raised
)


class ToolFailed(Exception):
    """The tool raised (the message is its repr, made in the worker) or its worker died."""


class _NotTaken(Exception):
    """The worker died before it took the call: the tool did not run."""


def _died(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _worker_env() -> dict[str, str]:
    # The worker imports what the server can: its modules, and the operator's from sys.path.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}


class _Worker:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls) -> _Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            # Its sys.path is the server's (below), without the working directory put first.
            "-P",
            "-m",
            "actors.tools.worker",
            str(os.getpid()),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=_worker_env(),
            # Its own process group: the kill reaches what a tool started, and a Ctrl-C on the
            # server's terminal does not reach the worker (the server stops it).
            start_new_session=True,
            limit=_LINE_LIMIT,
        )
        return cls(process)

    @property
    def alive(self) -> bool:
        return self.process.returncode is None and not self._stdout.at_eof()

    @property
    def _stdout(self) -> asyncio.StreamReader:
        assert self.process.stdout is not None
        return self.process.stdout

    async def call(self, request: bytes) -> Returned | Raised:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(request)
            await self.process.stdin.drain()
            taken = await self._stdout.readline()
        except ConnectionError:
            raise _NotTaken from None
        if not taken:
            raise _NotTaken
        if taken != _TAKEN:
            await self.kill()
            raise ToolFailed("its worker process answered out of turn")
        try:
            reply = _DECODE.decode(await self._stdout.readline() or b"null")
        except (ValueError, msgspec.DecodeError):
            # EOF (decoded as null) or a line over the limit: either way this worker is done.
            code = await self.kill()
            raise ToolFailed(f"its worker process stopped ({_died(code)})") from None
        if isinstance(reply, Taken):
            await self.kill()
            raise ToolFailed("its worker process answered out of turn")
        return reply

    async def kill(self) -> int:
        """SIGKILL the worker and what it started, and reap it: no zombie stays behind."""
        # Once reaped, its pid (the group's id) may belong to someone else.
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.stdin is not None:
            self.process.stdin.close()
        return await self.process.wait()


class WorkerPool:
    """Up to `size` worker processes, started when a call needs one and kept while idle."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self._slots = asyncio.Semaphore(size)
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._closed = False

    @property
    def pids(self) -> frozenset[int]:
        """The worker processes now running, idle or busy."""
        return frozenset(w.process.pid for w in [*self._idle, *self._busy])

    async def call(self, target: str, arguments: str, *, max_chars: int) -> str:
        """Run `target(**arguments)` in a worker; the caller's timeout or cancellation kills it.

        Raises what the tool raised as the tool actor reports it: TypeError (bad arguments),
        ToolError (refused), ToolFailed (anything else, or a worker that died).
        """
        request = _ENCODE.encode(Call(target=target, arguments=arguments, max_chars=max_chars))
        async with self._slots:
            reply = await self._run(request + b"\n")
        match reply:
            case Returned(content=content):
                return content
            case Raised(reason="arguments", message=message):
                raise TypeError(message)
            case Raised(reason="refused", message=message):
                raise ToolError(message)
            case Raised(message=message):
                raise ToolFailed(message)

    async def _run(self, request: bytes) -> Returned | Raised:
        for _ in range(2):
            worker = await self._take()
            try:
                reply = await worker.call(request)
            except _NotTaken:
                await self._drop(worker)
                continue
            except BaseException:
                # A timeout, a cancellation, a worker that died mid-call: never reused.
                await self._drop(worker)
                raise
            self._busy.discard(worker)
            if self._closed:
                await worker.kill()
            else:
                self._idle.append(worker)
            return reply
        raise ToolFailed("its worker process exited before it took the call")

    async def _take(self) -> _Worker:
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                self._busy.add(worker)
                return worker
            await worker.kill()
        if self._closed:
            raise ToolError("the tool runner has stopped")
        worker = await _Worker.start()
        self._busy.add(worker)
        return worker

    async def _drop(self, worker: _Worker) -> None:
        self._busy.discard(worker)
        await worker.kill()

    async def close(self) -> None:
        """Kill every worker, idle or mid-call, and reap them."""
        self._closed = True
        workers = [*self._idle, *self._busy]
        self._idle.clear()
        await asyncio.gather(*(w.kill() for w in workers))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()
