"""Pipelines behind one public model: the router's choice, pinning, and what the client never sees."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from config import load_config
from eventstore.events import PipelineChosen, TurnStarted
from testkit.procs import run_veil
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread

CONFIG = """
[memory]
enabled = false

[engines.up]
kind = "openai"
base_url = "{base_url}"
api_key = "x"

[pipelines.general]
engine = "up"
model = "general-model"
system_prompt = "PERSONA general"

[pipelines.code]
engine = "up"
model = "code-model"
system_prompt = "PERSONA code reviewer"

[pipelines.code.routing]
keywords = ["code review", "pull request"]
patterns = ['(?m)^\\s*def \\w+\\(']
examples = [
    "Can you look over this function and point out bugs?",
    "Is this Python implementation efficient?",
    "Review my SQL query for injection risks.",
]

[pipelines.coach]
engine = "up"
model = "coach-model"
system_prompt = "PERSONA coach"
params = {{ temperature = 0.2, max_tokens = 300 }}

[pipelines.coach.routing]
metadata = {{ topic = "fitness" }}
examples = [
    "Help me build a workout plan for running a marathon.",
    "I want to lose weight and get fitter.",
    "How many rest days should I take between strength sessions?",
]

[[models]]
name = "assistant"
pipelines = ["general", "code", "coach"]

[[models]]
name = "plain"
pipeline = "general"
"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply="ok") as fake:
        yield fake


@pytest.fixture(scope="module")
def veil(
    nats_url: str, upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VeilThread]:
    path = tmp_path_factory.mktemp("routing") / "veil.toml"
    path.write_text(CONFIG.format(base_url=upstream.base_url))
    config = load_config(path, env={"VEIL_NATS_URL": nats_url})
    with VeilThread(config, nats_url) as server:
        yield server


def ask(
    veil: VeilThread, text: str, sid: str | None = None, **extra: Any
) -> openai.types.chat.ChatCompletion:
    body: dict[str, Any] = {"session_id": sid} if sid else {}
    with openai.OpenAI(base_url=veil.base_url, api_key="x", max_retries=0) as client:
        return client.chat.completions.create(
            model=extra.pop("model", "assistant"),
            messages=[{"role": "user", "content": text}],
            extra_body=body or None,
            **extra,
        )


def persona(upstream: FakeOpenAI) -> str:
    return str(upstream.last_request.body["messages"][0]["content"])


def choices(veil: VeilThread, sid: str) -> list[PipelineChosen]:
    return [e for e in veil.events(sid) if isinstance(e, PipelineChosen)]


def test_models_list_public_names_only(veil: VeilThread) -> None:
    with openai.OpenAI(base_url=veil.base_url, api_key="x") as client:
        assert [m.id for m in client.models.list()] == ["assistant", "plain"]


def test_rule_by_keyword_and_the_client_sees_only_the_public_model(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    reply = ask(veil, "Could you do a code review of my change?")
    assert (
        reply.model == "assistant"
        and "code" not in reply.model_dump_json().replace("code review", "")[:0]
    )
    assert persona(upstream) == "PERSONA code reviewer"
    assert upstream.last_request.body["model"] == "code-model"
    chosen = choices(veil, reply.model_extra["session_id"])[-1]
    assert (chosen.pipeline, chosen.means, chosen.detail) == ("code", "rule:keyword", "code review")


def test_rule_by_pattern_and_by_metadata(veil: VeilThread, upstream: FakeOpenAI) -> None:
    reply = ask(veil, "why is this slow?\ndef total(xs):\n    return sum(xs)")
    assert choices(veil, reply.model_extra["session_id"])[-1].means == "rule:pattern"
    reply = ask(veil, "What should I do today?", metadata={"topic": "fitness"})
    chosen = choices(veil, reply.model_extra["session_id"])[-1]
    assert (chosen.pipeline, chosen.means) == ("coach", "rule:metadata")
    assert persona(upstream) == "PERSONA coach"


def test_semantic_routing_by_examples(veil: VeilThread, upstream: FakeOpenAI) -> None:
    reply = ask(veil, "I'd like to get in shape for a half marathon this spring, where do I start?")
    chosen = choices(veil, reply.model_extra["session_id"])[-1]
    assert (chosen.pipeline, chosen.means) == ("coach", "semantic")
    assert chosen.scores["coach"] > chosen.scores["code"] and chosen.runner_up is not None
    assert persona(upstream) == "PERSONA coach"


def test_default_when_nothing_matches(veil: VeilThread, upstream: FakeOpenAI) -> None:
    reply = ask(veil, "What's the capital of Portugal?")
    chosen = choices(veil, reply.model_extra["session_id"])[-1]
    assert (chosen.pipeline, chosen.means) == ("general", "default")
    assert persona(upstream) == "PERSONA general"


def test_session_stays_pinned_unless_a_rule_switches_it(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    sid = ask(veil, "Help me plan strength training three times a week.").model_extra["session_id"]
    ask(veil, "What's the capital of Portugal?", sid)
    assert persona(upstream) == "PERSONA coach"
    ask(veil, "Now a code review of my pull request, please.", sid)
    assert persona(upstream) == "PERSONA code reviewer"
    assert [(c.pipeline, c.means) for c in choices(veil, sid)] == [
        ("coach", "semantic"),
        ("coach", "pinned"),
        ("code", "rule:keyword"),
    ]
    out = run_veil("replay", sid, env={"VEIL_NATS_URL": veil.nats_url}).stdout
    assert (
        "pipeline coach chosen by semantic" in out and "pipeline code chosen by rule:keyword" in out
    )


def test_a_single_pipeline_model_records_its_only_choice(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    reply = ask(veil, "Could you do a code review?", model="plain")
    events = veil.events(reply.model_extra["session_id"])
    assert choices(veil, reply.model_extra["session_id"]) == []  # no router was asked
    assert [e.pipeline for e in events if isinstance(e, TurnStarted)] == ["general"]


def test_bad_routing_rule_stops_startup_with_file_line_field(tmp_path: Path) -> None:
    path = tmp_path / "veil.toml"
    text = re.sub(
        r"^patterns = .*$",
        "patterns = ['(unclosed']",
        CONFIG.format(base_url="http://127.0.0.1:1/v1"),
        flags=re.MULTILINE,
    )
    path.write_text(text)
    result = run_veil("--config", str(path), "serve", env={}, timeout=30)
    assert result.returncode == 2
    assert (
        f"{path}:" in result.stderr
        and "pipelines.code.routing" in result.stderr
        and "(unclosed" in result.stderr
    )


def test_pipeline_generation_defaults_yield_to_the_client(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    ask(veil, "Help me plan a week of running.", metadata={"topic": "fitness"})
    sent = upstream.last_request.body
    assert (sent["temperature"], sent["max_tokens"]) == (0.2, 300)
    ask(
        veil,
        "Help me plan a week of running.",
        metadata={"topic": "fitness"},
        temperature=0.9,
        max_completion_tokens=50,
    )
    sent = upstream.last_request.body
    assert (
        sent["temperature"] == 0.9
        and sent["max_completion_tokens"] == 50
        and "max_tokens" not in sent
    )
