"""Calling a model actor: one generation on one engine of a pipeline's chain.

Retries and fallbacks along the chain are the turn's decisions (actors/turn.py).
"""

from __future__ import annotations

import asyncio
import secrets

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from bus import telemetry
from bus.codec import DecodeError
from bus.requests import BUS_DOWN, nats_request
from bus.subjects import MODEL_JOBS, model_generate
from config import FallbackConfig
from contracts.errors import ErrorInfo
from contracts.model import (
    GENERATE_CODEC,
    GENERATE_RESULT_CODEC,
    JOB_PROBE_CODEC,
    GenerateRequest,
    GenerateResult,
    JobProbe,
)

__all__ = ["JOB_MISSES", "JOB_QUIET", "call_model"]

# A generation that has not answered for this long: ask who runs it...
JOB_QUIET = 2.0
# ...and give it up after this many asks in a row that nobody answered within
# PROBE_SECONDS (a model actor answers from its event loop at once: two silences 3 s
# apart are no busy moment). A dead model worker is found out in about 6 s.
JOB_MISSES = 2
PROBE_SECONDS = 1.0


async def _job_runs(nc: Client, job_id: str | None, timeout: float) -> bool:
    """Whether a model actor says it runs the job. True when it cannot be told: no model
    actor listens (ones of a version before this question), the bus is down, or the job
    has no id."""
    if job_id is None or not nc.is_connected:
        return True
    try:
        await nats_request(
            nc, MODEL_JOBS, JOB_PROBE_CODEC.encode(JobProbe(job_id=job_id)), timeout=timeout
        )
    except NatsTimeout:
        return False  # model actors listen, and none runs it
    except (NoRespondersError, *BUS_DOWN):
        return True
    return True


def _failed(link: FallbackConfig, error: ErrorInfo) -> GenerateResult:
    return GenerateResult(engine=link.engine, upstream_model=link.model, error=error)


async def call_model(
    nc: Client,
    link: FallbackConfig,
    job: GenerateRequest,
    timeout: float,
    *,
    quiet: float = JOB_QUIET,
    probe: float = PROBE_SECONDS,
) -> GenerateResult:
    """One generation on one engine; bus failures come back as a result with an error.

    While it waits, every `quiet` seconds it asks the model actors who runs the job:
    a model worker that died mid-generation (its reply would never come) is found out
    by JOB_MISSES silent asks in a row, not by the turn's timeout.
    """
    job = msgspec.structs.replace(job, job_id=job.job_id or f"job_{secrets.token_hex(8)}")
    call = asyncio.ensure_future(
        nats_request(
            nc,
            model_generate(link.engine),
            GENERATE_CODEC.encode(job),
            timeout=timeout,
            headers=telemetry.outgoing(),
        )
    )
    try:
        misses = 0
        while True:
            done, _ = await asyncio.wait({call}, timeout=quiet)
            if done:
                break
            misses = 0 if await _job_runs(nc, job.job_id, probe) else misses + 1
            if misses >= JOB_MISSES:
                return _failed(
                    link,
                    ErrorInfo(
                        status=503,
                        type="api_error",
                        code="model_worker_lost",
                        message="The model worker stopped during the generation.",
                        retryable=True,
                    ),
                )
        reply = call.result()
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
    finally:
        call.cancel()
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
