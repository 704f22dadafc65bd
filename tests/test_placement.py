"""Sessions placed on workers (issue 16): with two workers, each session's turns all run
on the worker that serves its partition, whichever gateway they came through, so a
session's actor is active in one worker only; when that worker leaves, the other takes
its partitions and serves its sessions."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import openai
import pytest

from bus.placement import owners
from bus.subjects import PARTITIONS, partition_of
from config import ApiKey, Config, EngineConfig, MemoryConfig, ModelConfig, PipelineConfig
from eventstore.events import TurnStarted
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread
from veil.natsserver import NatsServer

KEY = "sk-placement"
TENANT = "acme"
SESSIONS = 12
PATIENCE = 30.0


def _config(upstream: FakeOpenAI, nats_url: str) -> Config:
    return Config(
        keys=[ApiKey(key=KEY, tenant=TENANT)],
        engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
        pipelines={"default": PipelineConfig(engine="up", model="m")},
        models=[ModelConfig(name="veil", pipeline="default")],
        nats_url=nats_url,
        memory=MemoryConfig(enabled=False),
    )


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    # Its own server: only this module's two workers serve its sessions.
    with NatsServer(tmp_path_factory.mktemp("placement-nats")) as server:
        yield server


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _chat(veil: VeilThread, name: str, text: str) -> None:
    with openai.OpenAI(
        base_url=veil.base_url, api_key=KEY, max_retries=0, timeout=PATIENCE
    ) as client:
        client.chat.completions.create(
            model="veil",
            messages=[{"role": "user", "content": text}],
            extra_headers={"X-Session-Id": name},
        )


def _holders(veil: VeilThread, name: str) -> list[str | None]:
    return [e.holder for e in veil.events(name, TENANT) if isinstance(e, TurnStarted)]


def _wait_until(condition: object, what: str) -> None:
    pause = threading.Event()
    for _ in range(int(PATIENCE / 0.02)):
        if callable(condition) and condition():
            return
        pause.wait(0.02)
    raise AssertionError(f"gave up waiting for {what}")


def test_turns_stay_on_their_partitions_worker_and_move_when_it_leaves(
    own_nats: NatsServer, upstream: FakeOpenAI
) -> None:
    config = _config(upstream, own_nats.url)
    with VeilThread(config, own_nats.url) as first, VeilThread(config, own_nats.url) as second:
        ids = {first.workers.placement.member, second.workers.placement.member}
        _wait_until(
            lambda: (
                len(first.workers.placement.owned) + len(second.workers.placement.owned)
                == PARTITIONS
                and first.workers.placement.members == ids
            ),
            "the two workers to split the partitions",
        )
        names = [f"placed-{i}" for i in range(SESSIONS)]
        for turn in range(3):
            for i, name in enumerate(names):
                # Turns alternate between the two gateways.
                _chat((first, second)[(i + turn) % 2], name, f"turn {turn}")

        table = owners(ids, PARTITIONS)
        for name in names:
            holders = _holders(first, name)
            assert len(holders) == 3
            # Every turn on the one worker that serves the session's partition.
            assert set(holders) == {table[partition_of(TENANT, name)]}, name
        assert {_holders(first, n)[0] for n in names} == ids, "both workers serve sessions"
        # Each session is active in one worker only: never activated again elsewhere.
        assert first.workers.sessions.active + second.workers.sessions.active == SESSIONS

        leaving = second.workers.placement.member
        moved = [n for n in names if table[partition_of(TENANT, n)] == leaving]
        second.stop()
        _wait_until(
            lambda: len(first.workers.placement.owned) == PARTITIONS,
            "the remaining worker to take every partition",
        )
        for name in moved:
            _chat(first, name, "after the move")
            assert _holders(first, name)[-1] == first.workers.placement.member
            assert len(_holders(first, name)) == 4
