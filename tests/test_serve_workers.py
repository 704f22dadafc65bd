"""`veil serve --workers N` as a user runs it: a gateway, N worker processes, one memory
process and nats-server, started, kept and stopped together; `veil worker --roles`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from bus.connection import connect
from testkit.procs import VeilProcess, processes_mentioning, run_veil
from testkit.upstreams import FakeOpenAI
from tests.test_processes import CLEAN, KEY
from veil.natsserver import NatsServer

SECRET = "heron-velvet-4417"
# Starting three Python processes that load the actors shares 2 cores here.
START = 240


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _env(data: Path, upstream: FakeOpenAI) -> dict[str, str]:
    return {
        **CLEAN,
        "VEIL_DATA_DIR": str(data),
        "VEIL_API_KEYS": KEY,
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": "x",
    }


def _ask(base: str, text: str, sid: str | None = None) -> Any:
    """A turn for the end user "ann" (long-term memory is per user)."""
    with openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=30) as client:
        return client.chat.completions.create(
            model="veil",
            messages=[{"role": "user", "content": text}],
            extra_body={"session_id": sid} if sid else None,
            user="ann",
        )


def _recalls_secret(base: str, upstream: FakeOpenAI, timeout: float = 90) -> bool:
    """Whether a new session of the same user gets the secret into its prompt, asking
    again (each time in a new session) while the memory index catches up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = _ask(base, "What is my code word?")
        assert reply.choices[0].message.content == "echo: What is my code word?"
        if SECRET in json.dumps(upstream.last_request.body["messages"]):
            return True
        time.sleep(0.5)
    return False


def _children(pid: int) -> dict[int, str]:
    """Direct children of pid: their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # The second field, (comm), may hold spaces: the parent pid follows its ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and _alive(int(entry.name)):
            found[int(entry.name)] = cmdline
    return found


def _with_roles(children: dict[int, str], roles: str) -> list[int]:
    return sorted(pid for pid, cmd in children.items() if f"--roles {roles}" in cmd)


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


async def _instances(url: str, service: str) -> int:
    """How many instances answer `$SRV.STATS.<service>` (as `nats micro stats` counts)."""
    nc = await connect(url, name="test-serve-workers")
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(f"$SRV.STATS.{service}", b"", reply=inbox)
        count = 0
        try:
            while True:
                msg = await sub.next_msg(timeout=0.5)
                # With no instance left, the server says so: a 503 status, no data.
                count += bool(msg.data)
        except TimeoutError:  # nats.errors.TimeoutError is one
            return count
    finally:
        await nc.drain()


def test_serve_with_two_workers(tmp_path: Path, upstream: FakeOpenAI) -> None:
    data = tmp_path / "data"
    serve = VeilProcess("serve", "--port", "0", "--workers", "2", env=_env(data, upstream))
    try:
        port = serve.wait_for(r"Veil listening on http://127\.0\.0\.1:(\d+)/v1", START).group(1)
        base = f"http://127.0.0.1:{port}/v1"
        assert any("2 serving turns, 1 indexing memory" in line for line in serve.lines)

        # The tree: nats-server, two turn workers and one memory worker under the gateway.
        children = _children(serve.pid)
        assert len(_with_roles(children, "sessions,models")) == 2, children
        assert len(_with_roles(children, "memory,usage")) == 1, children
        nats_pids = processes_mentioning(str(data / "nats"))
        assert len(nats_pids) == 1 and nats_pids[0] in children, children
        assert len(children) == 4, children
        url = (data / "nats.url").read_text().strip()
        assert asyncio.run(_instances(url, "veil-session")) == 2
        assert asyncio.run(_instances(url, "veil-model")) == 2
        assert asyncio.run(_instances(url, "veil-memory")) == 1, "one index owner"

        # Turns, and memory recalled in another session of the same user.
        first = _ask(base, f"Remember: my code word is {SECRET}.")
        sid = first.model_extra["session_id"]
        assert _ask(base, "Second message.", sid).choices[0].message.content == (
            "echo: Second message."
        )
        assert _recalls_secret(base, upstream), "memory recalled across sessions"

        # A worker killed outright is started again, and turns keep working.
        victim = _with_roles(children, "sessions,models")[0]
        os.kill(victim, signal.SIGKILL)
        serve.wait_for(r"worker\.exited", 30)

        def replaced() -> bool:
            now = _with_roles(_children(serve.pid), "sessions,models")
            return len(now) == 2 and victim not in now

        _wait_until(replaced, 60, "a new worker in place of the killed one")
        serve.wait_for(r"worker\.restarting", 30)
        _wait_until(lambda: asyncio.run(_instances(url, "veil-session")) == 2, START, "2 workers")
        for i in range(6):
            assert _ask(base, f"after {i}").choices[0].message.content == f"echo: after {i}"
        reply = _ask(base, "Still the same session?", sid)
        assert reply.choices[0].message.content == "echo: Still the same session?"
        assert "Second message." in json.dumps(upstream.last_request.body["messages"])
        everyone = [*_children(serve.pid), serve.pid]
    finally:
        if serve.proc.poll() is None:
            serve.proc.send_signal(signal.SIGTERM)
        code = serve.proc.wait(60)
        serve.stop()
    # SIGTERM stops every process, nats-server included.
    assert code == 0, serve.lines
    assert "Stopped." in serve.lines
    assert not [pid for pid in everyone if _alive(pid)], serve.lines
    assert not processes_mentioning(str(data / "nats"))


def test_worker_with_memory_role_alone_indexes(tmp_path: Path, upstream: FakeOpenAI) -> None:
    bad = run_veil("worker", "--roles", "sessions,cooking", env={**CLEAN})
    assert bad.returncode == 2 and "unknown role cooking" in bad.stderr, bad.stderr
    with NatsServer(tmp_path / "nats") as server:
        env = {**_env(tmp_path, upstream), "VEIL_NATS_URL": server.url}
        # The turn worker first: were it to take the index lock, the memory worker
        # would find it held.
        turns = VeilProcess("worker", "--roles", "sessions,models", env=env)
        memory: VeilProcess | None = None
        gateway: VeilProcess | None = None
        try:
            turns.wait_for(r"Workers ready: .*\(roles sessions,models\)", START)
            memory = VeilProcess("worker", "--roles", "memory", env=env)
            memory.wait_for(r"Workers ready: .*\(roles memory\)", START)
            gateway = VeilProcess("gateway", "--port", "0", env=env)
            port = gateway.wait_for(r"Veil listening on http://127\.0\.0\.1:(\d+)/v1").group(1)
            base = f"http://127.0.0.1:{port}/v1"
            assert asyncio.run(_instances(server.url, "veil-session")) == 1
            assert asyncio.run(_instances(server.url, "veil-memory")) == 1
            _ask(base, f"Remember: my code word is {SECRET}.")
            assert _recalls_secret(base, upstream), "the memory worker indexed the turn"
            # The index was the memory worker's: without it, no one serves memory.
            assert memory.interrupt() == 0, memory.lines
            assert asyncio.run(_instances(server.url, "veil-memory")) == 0
            assert _ask(base, "Still answering?").choices[0].message.content == (
                "echo: Still answering?"
            )
        finally:
            codes = [p.stop() for p in (gateway, memory, turns) if p is not None]
        assert codes == [0] * len(codes), turns.lines


def test_ctrl_c_stops_workers_in_order(tmp_path: Path, upstream: FakeOpenAI) -> None:
    serve = VeilProcess("serve", "--port", "0", "--workers", "2", env=_env(tmp_path, upstream))
    try:
        port = serve.wait_for(r"Veil listening on http://127\.0\.0\.1:(\d+)/v1", START).group(1)
        assert _ask(f"http://127.0.0.1:{port}/v1", "hello").choices[0].message.content == (
            "echo: hello"
        )
        everyone = [*_children(serve.pid), serve.pid]
        assert len(everyone) == 5, everyone
    finally:
        # SIGINT to the terminal's whole process group: the workers run in their own, so
        # the parent alone hears it and stops them before nats-server.
        code = serve.ctrl_c(60)
    assert code == 0, serve.lines
    assert "Stopped." in serve.lines
    assert not any("nats.error" in line or "Traceback" in line for line in serve.lines), serve.lines
    assert not [pid for pid in everyone if _alive(pid)]
    assert not processes_mentioning(str(tmp_path / "nats"))


def test_workers_get_a_metrics_port_of_their_own_when_the_config_file_sets_one() -> None:
    # The parent listens on the configured port: children reading the same file would
    # fail to bind it and restart in a loop.
    from config import Config
    from veil.cli import _parser, _worker_args

    config = Config()
    args = _parser().parse_args(["serve", "--workers", "2"])
    assert "--metrics-port" not in _worker_args(args, config)
    config.server.metrics_port = 9464
    worker_args = _worker_args(args, config)
    assert worker_args[worker_args.index("--metrics-port") + 1] == "0"
