"""The model actor: runs generations for the engines configured on this worker.

Each engine is one micro service endpoint on `model.<engine>.generate` in a
queue group, so every worker that has the engine shares its load. Generations
run as their own tasks: the subscription callback only starts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from functools import partial
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.trace import Span

from actors.engines import Engine, EngineError, EngineOutput, estimate_tokens
from actors.engines.base import ChoicePiece, ToolCallPiece
from actors.metrics import WorkerMetrics
from bus import telemetry
from bus.codec import DecodeError
from bus.service import Endpoint, TypedService, start_service
from bus.signals import Signals
from bus.subjects import MODEL_JOBS, SESSION_CANCEL_WILDCARD, model_generate
from contracts.errors import ErrorInfo
from contracts.model import (
    GENERATE_CODEC,
    GENERATE_RESULT_CODEC,
    JOB_PROBE_CODEC,
    JOB_RUNNING_CODEC,
    GenerateRequest,
    GenerateResult,
    JobRunning,
)
from contracts.session import OUTPUT_CODEC, Delta, Deltas, ToolDelta
from eventstore.events import Usage

__all__ = ["ModelActor"]

log = structlog.get_logger("veil.model")


class ModelActor:
    def __init__(
        self,
        nc: Client,
        engines: dict[str, Engine],
        *,
        version: str,
        signals: Signals | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._nc = nc
        self._metrics = metrics
        # Cancellations of every turn, on one subscription (shared with the session actors).
        self._signals = signals or Signals(nc, SESSION_CANCEL_WILDCARD)
        self._engines = engines
        self._version = version
        self._service: TypedService | None = None
        # The jobs running here, by the caller's job id (answered on MODEL_JOBS).
        self._jobs: set[str] = set()
        self._jobs_sub: Subscription | None = None

    async def start(self) -> None:
        self._service = service = await start_service(
            self._nc,
            name="veil-model",
            version=self._version,
            description="Runs generations against the configured model engines",
            endpoints=[
                Endpoint(
                    name=name,
                    subject=model_generate(name),
                    request=GENERATE_CODEC,
                    reply=GENERATE_RESULT_CODEC,
                    handle=partial(self.generate, name),
                    concurrent=True,
                )
                for name in self._engines
            ],
        )
        if self._metrics is not None:
            self._metrics.watch_running("veil-model", lambda: service.running)
        self._jobs_sub = await self._nc.subscribe(MODEL_JOBS, cb=self._answer_probe)

    async def _answer_probe(self, msg: Msg) -> None:
        """Say so when a job asked about runs here; stay silent otherwise (another model
        actor may run it: silence from all of them means nobody does)."""
        try:
            probe = JOB_PROBE_CODEC.decode(msg.data)
        except DecodeError:
            return
        if probe.job_id in self._jobs:
            with contextlib.suppress(Exception):
                await msg.respond(JOB_RUNNING_CODEC.encode(JobRunning(job_id=probe.job_id)))

    async def generate(self, engine_name: str, job: GenerateRequest) -> GenerateResult:
        # The GenAI conventions' inference span: this actor is the upstream's client.
        name = f"chat {job.upstream_model}"
        with telemetry.span(name, kind=telemetry.SpanKind.CLIENT) as span:
            if span is not None:
                span.set_attributes(self._request_attributes(engine_name, job))
            if job.job_id is not None:
                self._jobs.add(job.job_id)
            try:
                result = await self._generate(engine_name, job)
            finally:
                if job.job_id is not None:
                    self._jobs.discard(job.job_id)
            if span is not None:
                _describe(span, result)
        if self._metrics is not None:
            self._metrics.model_call(result)
        return result

    def _request_attributes(self, engine_name: str, job: GenerateRequest) -> dict[str, Any]:
        provider = _PROVIDERS.get(type(self._engines[engine_name]).__name__, "veil")
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": provider,
            "gen_ai.system": provider,  # the name before gen_ai.provider.name, for older backends
            "gen_ai.request.model": job.upstream_model,
            "gen_ai.request.stream": job.out_subject is not None,
            "veil.engine": engine_name,
            "veil.turn.id": job.turn_id,
        }
        for param, attribute in _REQUEST_PARAMS.items():
            given = job.params.get(param)
            if isinstance(given, int | float) and not isinstance(given, bool):
                attributes[attribute] = given
        return attributes

    async def _generate(self, engine_name: str, job: GenerateRequest) -> GenerateResult:
        engine = self._engines[engine_name]
        output = EngineOutput()
        deltas = 0
        nc = self._nc

        hidden_indexes: set[int] = set()
        batcher = _DeltaBatcher(nc, job.out_subject) if job.out_subject else None

        async def on_delta(piece: str | ToolCallPiece | ChoicePiece) -> None:
            nonlocal deltas
            if isinstance(piece, ToolCallPiece):
                if piece.name is not None and piece.name in job.hidden_tools:
                    hidden_indexes.add(piece.index)
                if piece.index in hidden_indexes:
                    return  # a server tool's call: behind the curtain
            deltas += 1
            assert batcher is not None
            if isinstance(piece, str):
                message: Delta | ToolDelta = Delta(seq=deltas, text=piece)
            elif isinstance(piece, ChoicePiece):
                message = Delta(seq=deltas, text=piece.text, choice=piece.index)
            else:
                message = ToolDelta(
                    seq=deltas,
                    index=piece.index,
                    id=piece.id,
                    name=piece.name,
                    arguments=piece.arguments,
                )
            batcher.add(message)

        # A cancellation signal cancels this task while the engine runs: no task of its own.
        this = asyncio.current_task()
        assert this is not None
        generating = True
        cancelled = False

        def on_cancel() -> None:
            nonlocal cancelled
            if generating and not cancelled:
                cancelled = True
                this.cancel()

        unwatch = (
            await self._signals.watch(job.cancel_subject, on_cancel) if job.cancel_subject else None
        )
        started = time.perf_counter()
        error: ErrorInfo | None = None
        try:
            await engine.generate(
                job.upstream_model,
                job.messages,
                job.params,
                on_delta if job.out_subject else None,
                output,
            )
        except asyncio.CancelledError:
            if not cancelled:
                raise  # shutting down
            this.uncancel()
        except EngineError as failure:
            error = failure.info
            if error.status >= 500:
                log.warning(
                    "engine.error",
                    engine=engine_name,
                    status=error.status,
                    code=error.code,
                    detail=error.detail,
                )
        except Exception as failure:  # noqa: BLE001 - an engine bug must not kill the worker
            log.error("engine.failed", engine=engine_name, error=repr(failure))
            error = ErrorInfo(
                status=502,
                type="api_error",
                code="engine_error",
                message="The model engine failed.",
                detail=repr(failure),
            )
        finally:
            generating = False
            if unwatch is not None:
                unwatch()
            if batcher is not None:
                await batcher.drain()
        latency = (time.perf_counter() - started) * 1000
        content = output.content
        usage = output.usage
        estimated = False
        if usage is None and (error is None or content):
            # The upstream sent no count: estimate it (a failed call that produced
            # nothing, one that never connected say, consumed nothing to count).
            prompt = sum(estimate_tokens(m.content) for m in job.messages)
            completion = estimate_tokens(content)
            usage = Usage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            )
            estimated = True
        return GenerateResult(
            engine=engine_name,
            upstream_model=job.upstream_model,
            content=content,
            finish_reason=output.finish_reason,
            usage=usage or Usage(),
            usage_estimated=estimated,
            latency_ms=round(latency, 3),
            ttft_ms=None if output.ttft_ms is None else round(output.ttft_ms, 3),
            deltas=deltas,
            error=error,
            cancelled=cancelled,
            tool_calls=output.tool_calls,
            alternatives=output.alternatives,
        )

    async def stop(self, grace: float = 10.0) -> None:
        if self._jobs_sub is not None:
            with contextlib.suppress(Exception):
                await self._jobs_sub.unsubscribe()
        if self._service is not None:
            await self._service.stop(grace)
        for engine in self._engines.values():
            with contextlib.suppress(Exception):
                await engine.aclose()


# gen_ai.provider.name by engine class (the well-known values where there is one).
_PROVIDERS = {
    "OpenAIEngine": "openai",
    "AnthropicEngine": "anthropic",
    "XLlamaEngine": "llama.cpp",
    "LlamaCppEngine": "llama.cpp",
    "VllmEngine": "vllm",
}
_REQUEST_PARAMS = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "seed": "gen_ai.request.seed",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
}


def _describe(span: Span, result: GenerateResult) -> None:
    """What came back, on the call's span."""
    span.set_attributes(
        {
            "gen_ai.response.model": result.upstream_model,
            "gen_ai.response.finish_reasons": [result.finish_reason],
            "gen_ai.usage.input_tokens": result.usage.prompt_tokens,
            "gen_ai.usage.output_tokens": result.usage.completion_tokens,
            "veil.usage.estimated": result.usage_estimated,
        }
    )
    if result.ttft_ms is not None:
        span.set_attribute("gen_ai.response.time_to_first_chunk", result.ttft_ms / 1000)
    if result.cancelled:
        span.set_attribute("veil.cancelled", True)
    elif result.error is not None:
        span.set_attribute("http.response.status_code", result.error.status)
        telemetry.failed(span, result.error.code)


class _DeltaBatcher:
    """Publishes the deltas an engine produces in one go as one message.

    An engine hands over every piece it read from one network read without
    yielding to the event loop; the flush runs when it next waits, so a burst
    becomes one publish (and one HTTP write at the gateway), while a lone token
    goes out as soon as the engine waits for the next one.
    """

    def __init__(self, nc: Client, subject: str) -> None:
        self._nc = nc
        self._subject = subject
        self._pending: list[Delta | ToolDelta] = []
        self._last: asyncio.Task[None] | None = None

    def add(self, message: Delta | ToolDelta) -> None:
        self._pending.append(message)
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        items, self._pending = self._pending, []
        if not items:
            return
        message = items[0] if len(items) == 1 else Deltas(items=items)
        # Tasks start in creation order, so batches are published in order.
        self._last = asyncio.ensure_future(
            self._nc.publish(self._subject, OUTPUT_CODEC.encode(message))
        )

    async def drain(self) -> None:
        """Publish what is pending and wait until the last batch is handed to NATS."""
        self._flush()
        if self._last is not None:
            with contextlib.suppress(Exception):
                await self._last
