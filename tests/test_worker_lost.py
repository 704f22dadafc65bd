"""A worker SIGKILLed mid-turn (issue 16): the stream waiting on its turn gets a 503
`worker_lost` instead of silence, and a retry under the same Idempotency-Key, on the
worker left, closes the dead turn and runs it again to completion. Real processes: a
nats-server, a gateway and two workers; the upstream holds the first call, so "mid-turn"
is a fact, not a timing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import openai
import pytest

from config.schema import key_id
from eventstore.events import EventUnion, ReplyCompleted, TurnFailed, TurnStarted
from eventstore.jetstream import JetStreamEventStore
from testkit.procs import VeilProcess
from testkit.upstreams import FakeOpenAI
from tests.test_processes import CLEAN, KEY
from veil.natsserver import NatsServer

PATIENCE = 60.0
# A key from VEIL_API_KEYS is a tenant of its own, named by its key id.
TENANT = key_id(KEY)
LISTENING = r"Veil listening on http://127\.0\.0\.1:(\d+)/v1"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _events(nats_url: str, tenant: str, session_id: str) -> list[EventUnion]:
    async def read() -> list[EventUnion]:
        nc = await nats.connect(nats_url)
        try:
            store = JetStreamEventStore(nc.jetstream(), nc)
            return [s.event for s in await store.load(tenant, session_id)]
        finally:
            await nc.close()

    return asyncio.run(read())


def test_a_killed_workers_stream_fails_fast_and_its_retry_completes(
    tmp_path: Path, upstream: FakeOpenAI
) -> None:
    with NatsServer(tmp_path / "nats") as server:
        env = {
            **CLEAN,
            "VEIL_NATS_URL": server.url,
            "VEIL_DATA_DIR": str(tmp_path / "data"),
            "VEIL_API_KEYS": KEY,
            "OPENAI_BASE_URL": upstream.base_url,
            "OPENAI_API_KEY": "x",
        }
        doomed = VeilProcess("worker", "--roles", "sessions,models", env=env)
        gateway = VeilProcess("gateway", "--port", "0", env=env)
        spare: VeilProcess | None = None
        try:
            doomed.wait_for("Workers ready", timeout=PATIENCE)
            port = gateway.wait_for(LISTENING, timeout=PATIENCE).group(1)
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60
            )
            headers = {"Idempotency-Key": "kill-me-once", "X-Session-Id": "lost-and-found"}
            gate = upstream.hold()
            outcome: list[Exception | str] = []

            def first_try() -> None:
                try:
                    stream = client.chat.completions.create(
                        model="veil",
                        messages=[{"role": "user", "content": "survive this"}],
                        stream=True,
                        extra_headers=headers,
                    )
                    outcome.append("".join(c.choices[0].delta.content or "" for c in stream))
                except Exception as error:  # noqa: BLE001 - what the client saw is the point
                    outcome.append(error)

            caller = threading.Thread(target=first_try, daemon=True)
            caller.start()
            deadline = time.monotonic() + PATIENCE
            while upstream.pending() < 1:  # the turn runs on the only worker
                assert time.monotonic() < deadline, "the turn never reached the upstream"
                time.sleep(0.02)
            spare = VeilProcess("worker", "--roles", "sessions,models", env=env)
            spare.wait_for("Workers ready", timeout=PATIENCE)
            doomed.kill()
            caller.join(PATIENCE)
            gate.set()
            assert not caller.is_alive(), "the stream stayed silent after its worker died"
            [seen] = outcome
            assert isinstance(seen, openai.APIStatusError), seen
            assert seen.status_code == 503
            assert seen.body is not None and seen.body["code"] == "worker_lost"  # type: ignore[index]

            stream = client.chat.completions.create(
                model="veil",
                messages=[{"role": "user", "content": "survive this"}],
                stream=True,
                extra_headers=headers,
            )
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text == "echo: survive this"

            events = _events(server.url, TENANT, "lost-and-found")
            started = [e for e in events if isinstance(e, TurnStarted)]
            failed = [e for e in events if isinstance(e, TurnFailed)]
            replies = [e for e in events if isinstance(e, ReplyCompleted)]
            assert len({e.turn_id for e in started}) == 1 and len(started) == 2
            assert [f.code for f in failed] == ["worker_lost"]
            assert len(replies) == 1  # answered once
            client.close()
        finally:
            for process in (gateway, doomed, spare):
                if process is not None:
                    process.stop()
