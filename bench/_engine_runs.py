"""What the engine benchmarks (local_model.py, vllm_engine.py) share: the prompts, one
timed streamed request, and memory readings."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.engines.base import Engine, EngineOutput
from eventstore.events import ChatMessage

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "How many legs does a spider have?",
    "What does a bee make?",
    "Give me a synonym for happy.",
    "What is 12 times 12?",
    "Which planet is closest to the sun?",
    "What language is spoken in Brazil?",
    "Why is the sky blue? Answer in one sentence.",
    "What is the boiling point of water in Celsius?",
]
STORY = "Write a long story about a dragon who learns to cook."


@dataclass
class Run:
    ttft_ms: float
    seconds: float
    completion_tokens: int
    finish_reason: str

    @property
    def decode_tokens_per_s(self) -> float:
        return max(0, self.completion_tokens - 1) / max(1e-9, self.seconds - self.ttft_ms / 1000)


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process and all its descendants."""
    pid = os.getpid() if pid is None else pid
    total = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += rss_mb(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


async def one(
    engine: Engine,
    model: str,
    prompt: str,
    params: dict[str, Any],
    started: float | None = None,
) -> Run:
    """One streamed request; TTFT counts from `started` (queueing included) when given."""
    output = EngineOutput()
    began = time.perf_counter() if started is None else started
    first: list[float] = []

    async def on_delta(_: object) -> None:
        if not first:
            first.append(time.perf_counter())

    await engine.generate(
        model, [ChatMessage(role="user", content=prompt)], params, on_delta, output
    )
    done = time.perf_counter()
    assert output.usage is not None
    return Run(
        ttft_ms=((first[0] if first else done) - began) * 1000,
        seconds=done - began,
        completion_tokens=output.usage.completion_tokens,
        finish_reason=output.finish_reason,
    )
