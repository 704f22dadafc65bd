"""Calling the model actors along a pipeline's chain: retries with backoff, then fallbacks.

Every failed attempt that is followed by another is handed to `record`, so the
log shows each one with its error. A stream that already reached the client is
never restarted on another model: its error ends the turn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from bus.codec import DecodeError
from bus.requests import nats_request
from bus.subjects import model_generate
from config import FallbackConfig, PipelineConfig
from contracts.errors import ErrorInfo
from contracts.model import GENERATE_CODEC, GENERATE_RESULT_CODEC, GenerateRequest, GenerateResult

__all__ = ["call_model", "run_chain"]

Recorder = Callable[[GenerateResult], Awaitable[None]]


def _failed(link: FallbackConfig, error: ErrorInfo) -> GenerateResult:
    return GenerateResult(engine=link.engine, upstream_model=link.model, error=error)


async def call_model(
    nc: Client, link: FallbackConfig, job: GenerateRequest, timeout: float
) -> GenerateResult:
    """One generation on one engine; bus failures come back as a result with an error."""
    try:
        reply = await nats_request(
            nc, model_generate(link.engine), GENERATE_CODEC.encode(job), timeout=timeout
        )
    except NoRespondersError:
        message = f"No worker serves the engine '{link.engine}'."
        return _failed(
            link,
            ErrorInfo(
                status=503,
                type="api_error",
                code="no_model_worker",
                message=message,
                retryable=True,
            ),
        )
    except NatsTimeout:
        message = "The model actor did not answer in time."
        return _failed(
            link,
            ErrorInfo(
                status=504, type="api_error", code="model_timeout", message=message, retryable=True
            ),
        )
    try:
        return GENERATE_RESULT_CODEC.decode(reply.data)
    except DecodeError as failure:
        message = f"The model actor answered badly: {failure}"
        return _failed(
            link, ErrorInfo(status=502, type="api_error", code="bad_model_reply", message=message)
        )


async def _pause(seconds: float, cancelled: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(cancelled.wait(), seconds)


async def run_chain(
    nc: Client,
    pipeline: PipelineConfig,
    make_job: Callable[[str], GenerateRequest],
    *,
    timeout: float,
    record: Recorder,
    cancelled: asyncio.Event,
) -> GenerateResult:
    """The first good result along the chain, or the last failure."""
    chain = pipeline.chain
    result: GenerateResult | None = None
    for index, link in enumerate(chain):
        job = make_job(link.model)
        for attempt in range(pipeline.retries + 1):
            result = await call_model(nc, link, job, timeout)
            error = result.error
            if error is None or result.cancelled or cancelled.is_set():
                return result
            if result.deltas > 0 or not error.retryable:
                return result
            last = index == len(chain) - 1 and attempt == pipeline.retries
            if last:
                return result
            await record(result)
            if attempt < pipeline.retries:
                wait = (
                    error.retry_after
                    if error.retry_after is not None
                    else pipeline.retry_backoff * 2**attempt
                )
                await _pause(min(wait, pipeline.max_retry_wait), cancelled)
                if cancelled.is_set():
                    return result
    assert result is not None
    return result
