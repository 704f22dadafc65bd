"""Calling a model actor: one generation on one engine of a pipeline's chain.

Retries and fallbacks along the chain are the turn's decisions (actors/turn.py).
"""

from __future__ import annotations

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from bus import telemetry
from bus.codec import DecodeError
from bus.requests import nats_request
from bus.subjects import model_generate
from config import FallbackConfig
from contracts.errors import ErrorInfo
from contracts.model import GENERATE_CODEC, GENERATE_RESULT_CODEC, GenerateRequest, GenerateResult

__all__ = ["call_model"]


def _failed(link: FallbackConfig, error: ErrorInfo) -> GenerateResult:
    return GenerateResult(engine=link.engine, upstream_model=link.model, error=error)


async def call_model(
    nc: Client, link: FallbackConfig, job: GenerateRequest, timeout: float
) -> GenerateResult:
    """One generation on one engine; bus failures come back as a result with an error."""
    try:
        reply = await nats_request(
            nc,
            model_generate(link.engine),
            GENERATE_CODEC.encode(job),
            timeout=timeout,
            headers=telemetry.outgoing(),
        )
    except NoRespondersError:
        return _failed(
            link,
            ErrorInfo(
                status=503,
                type="api_error",
                code="no_model_worker",
                message="No worker serves this model right now.",
                retryable=True,
                detail=f"no responders for the engine '{link.engine}'",
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
        error = ErrorInfo(
            status=502,
            type="api_error",
            code="bad_model_reply",
            message="The model actor answered badly.",
            detail=str(failure),
        )
        return _failed(link, error)
