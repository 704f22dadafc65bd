"""What both in-process GGUF engines (xllama.py, llamacpp.py) share: one worker thread per
engine that alone touches the native model, a queue of text pieces back to the event loop,
and cancellation at the next token.

The worker loads the model on first use and runs one generation at a time, in arrival
order, so a request cancelled while queued never starts. A subclass says how to turn a
request into its native form (`_request`, on the event loop: a 400 needs no trip to the
worker) and how to run it on the worker (`_load`, `_run`, `_unload`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from actors.engines.base import DeltaSink, EngineError, EngineOutput
from eventstore.events import ChatMessage, Usage

__all__ = ["Emit", "LocalEngine"]

R = TypeVar("R")
# Hands a piece of text to the event loop; None ends the generation's stream.
Emit = Callable[[str | None], None]


class LocalEngine(Generic[R]):
    """One GGUF model in this process; the `model` name a pipeline asks for is not checked."""

    thread_prefix = "local"

    def __init__(
        self,
        name: str,
        *,
        model_path: str | None = None,
        n_ctx: int = 4096,
        threads: int = 1,
        max_tokens_default: int = 512,
    ) -> None:
        self.name = name
        self._model_path = model_path
        self._n_ctx = n_ctx
        self._threads = threads
        self._max_tokens_default = max_tokens_default
        # One worker thread: it alone touches the model, and its queue serialises generations.
        self._worker = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"{self.thread_prefix}-{name}"
        )
        self._running: set[threading.Event] = set()

    # -- what a subclass provides ------------------------------------------------------------

    def _request(self, messages: list[ChatMessage], params: dict[str, Any]) -> R:
        raise NotImplementedError

    def _load(self) -> Any:
        raise NotImplementedError

    def _unload(self) -> None:
        raise NotImplementedError

    def _run(self, request: R, cancelled: threading.Event, emit: Emit) -> tuple[str, Usage]:
        """On the worker: generate, emitting text; the finish reason and usage."""
        raise NotImplementedError

    # -- on the event loop -------------------------------------------------------------------

    async def load(self) -> float:
        """Load the model now instead of on the first request; returns the seconds it took."""
        return float(await asyncio.wrap_future(self._submit(self._load_timed)))

    async def aclose(self) -> None:
        for flag in self._running:
            flag.set()
        try:
            await asyncio.wrap_future(self._worker.submit(self._unload))
        except RuntimeError:  # already closed
            pass
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def generate(
        self,
        model: str,
        messages: list[ChatMessage],
        params: dict[str, Any],
        on_delta: DeltaSink | None,
        output: EngineOutput,
    ) -> None:
        request = self._request(messages, params)  # a 400 needs no trip to the worker
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(text: str | None) -> None:
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, text)
            except RuntimeError:  # the loop is closed: nobody will read the rest
                cancelled.set()

        started = time.perf_counter()
        job = self._submit(self._generate, request, cancelled, emit)
        self._running.add(cancelled)
        try:
            while (text := await pieces.get()) is not None:
                if on_delta is not None and output.ttft_ms is None:
                    output.ttft_ms = (time.perf_counter() - started) * 1000
                output.parts.append(text)
                if on_delta is not None:
                    await on_delta(text)
            output.finish_reason, output.usage = await asyncio.wrap_future(job)
        finally:
            # Cancelled or on_delta failed: the generation ends at its next token, or the
            # job never starts. What arrived so far stays in output.
            cancelled.set()
            job.cancel()
            self._running.discard(cancelled)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        try:
            return self._worker.submit(fn, *args)
        except RuntimeError as error:  # submit after shutdown
            raise EngineError(
                503, "engine_closed", "The local engine is closed.", detail=self.name
            ) from error

    # -- on the worker thread ----------------------------------------------------------------

    def _load_timed(self) -> float:
        started = time.perf_counter()
        self._load()
        return time.perf_counter() - started

    def _generate(self, request: R, cancelled: threading.Event, emit: Emit) -> tuple[str, Usage]:
        try:
            return self._run(request, cancelled, emit)
        except EngineError:
            raise
        except Exception as error:
            raise EngineError(
                500, "engine_error", "The local model failed.", detail=repr(error)
            ) from error
        finally:
            emit(None)
