"""Veil scaled out on one machine, and faults injected into it while traffic runs.

`Rig`: a 3-node NATS JetStream cluster (testkit/cluster.py), 2 `veil worker` and 2 `veil
gateway` processes (VEIL_NATS_URL lists every node, VEIL_NATS_REPLICAS=3). Each worker
slot has a fake OpenAI upstream of its own (so "this worker is mid-stream" is "its
upstream is answering") and reaches NATS through a CutProxy of its own (so it alone can be
cut off). `run_faults` drives testkit/traffic.py's clients, injects the faults one at a
time, each only once the system worked again after the last, and then checks the log
(testkit/logcheck.py). Every wait is for a condition, with a generous timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from testkit.cluster import CutProxy, NatsCluster, free_ports
from testkit.logcheck import Findings, check_cli_replays, check_log, read_log
from testkit.procs import VeilProcess
from testkit.traffic import Traffic
from testkit.upstreams import FakeOpenAI, Fault

__all__ = ["KINDS", "FaultRecord", "Outcome", "Rig", "answer_for", "plan", "run_faults"]

KEY, AUDIT_KEY, TENANT = "sk-faults", "sk-faults-audit", "acme"
KINDS = ("worker_kill", "nats_restart", "gateway_restart", "worker_cut")
# The fake's answer: the question, then words streamed one by one.
WORDS = " ".join(f"w{i}" for i in range(24))
CLEAN = dict.fromkeys(
    (
        "VEIL_CONFIG",
        "VEIL_API_KEYS",
        "VEIL_UPSTREAM_MODEL",
        "OPENAI_BASE_URL",
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "VEIL_NATS_CA",
        "VEIL_NATS_CERT",
        "VEIL_NATS_KEY",
    ),
    "",
)


def answer_for(text: str) -> str:
    return f"{text} :: {WORDS}"


def _reply(body: dict[str, object]) -> str:
    messages = body.get("messages")
    assert isinstance(messages, list) and messages
    last = messages[-1]
    assert isinstance(last, dict)
    return answer_for(str(last.get("content")))


def _config(upstream: FakeOpenAI) -> str:
    return f"""
[[keys]]
key = "{KEY}"
tenant = "{TENANT}"

[[keys]]
key = "{AUDIT_KEY}"
tenant = "{TENANT}"
scopes = ["audit"]

[memory]
enabled = false

[engines.up]
kind = "openai"
base_url = "{upstream.base_url}"
api_key = "x"
timeout = 30

[pipelines.default]
engine = "up"
model = "up-model"

[[models]]
name = "veil"
pipeline = "default"
"""


class Rig:
    """The processes of a scaled-out Veil, each replaceable in its slot."""

    def __init__(self, where: Path, *, token_delay: float = 0.04) -> None:
        self.where = where
        self.cluster = NatsCluster(where)
        self.upstreams = [FakeOpenAI(reply=_reply) for _ in range(2)]
        self.token_delay = token_delay
        self.proxies: list[CutProxy] = []
        self.workers: list[VeilProcess | None] = [None, None]
        self.gateways: list[VeilProcess | None] = [None, None]
        self.gateway_ports = free_ports(2)
        self._started = 0

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}/v1" for p in self.gateway_ports]

    def _env(self, name: str, config: Path, nats: list[str]) -> dict[str, str]:
        return {
            **CLEAN,
            "VEIL_CONFIG": str(config),
            "VEIL_DATA_DIR": str(self.where / name),
            "VEIL_NATS_URL": ",".join(nats),
            "VEIL_NATS_REPLICAS": "3",
        }

    def start(self) -> None:
        self.cluster.start()
        asyncio.run(self.cluster.wait_until_healthy())
        for i, upstream in enumerate(self.upstreams):
            upstream.start_in_thread()
            upstream.inject(Fault(token_delay=self.token_delay), times=None)
            (self.where / f"worker-{i}.toml").write_text(_config(upstream))
            self.proxies.append(CutProxy(self.cluster.ports).start())
        for i in range(2):
            self.start_worker(i)
        for i in range(2):
            self.start_gateway(i)

    def start_worker(self, i: int) -> None:
        self._started += 1
        env = self._env(f"w{i}", self.where / f"worker-{i}.toml", self.proxies[i].urls)
        worker = VeilProcess("worker", "--roles", "sessions,models", env=env)
        self.workers[i] = worker
        worker.wait_for("Workers ready", timeout=90)

    def start_gateway(self, i: int) -> None:
        env = self._env(f"g{i}", self.where / "worker-0.toml", self.cluster.urls)
        port = str(self.gateway_ports[i])
        gateway = VeilProcess("gateway", "--port", port, env=env)
        self.gateways[i] = gateway
        gateway.wait_for(r"Veil listening on http://127\.0\.0\.1:\d+/v1", timeout=90)

    def stop(self) -> None:
        for proc in [*self.gateways, *self.workers]:
            if proc is not None:
                proc.stop(timeout=15)
        for proxy in self.proxies:
            proxy.stop()
        for upstream in self.upstreams:
            upstream.stop_thread()
        self.cluster.stop()


@dataclass
class FaultRecord:
    kind: str
    at: float
    detail: str = ""
    recovered_at: float | None = None

    @property
    def recovery(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.at


@dataclass
class Outcome:
    traffic: Traffic
    faults: list[FaultRecord]
    findings: Findings
    seconds: float
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        requests = self.traffic.requests
        attempts = sum(len(r.attempts) for r in requests)
        lines = [
            (
                f"turns driven: {len(requests)} requests, {len(self.traffic.completed)} "
                f"completed, {attempts} attempts, in {self.seconds:.0f} s"
            ),
            "faults: "
            + ", ".join(f"{k} {n}" for k, n in Counter(f.kind for f in self.faults).items()),
            "client errors: "
            + (", ".join(f"{k} {n}" for k, n in self.traffic.errors().most_common()) or "none"),
            "recovery (first successful turn after the fault), seconds:",
        ]
        by_kind: dict[str, list[float]] = {}
        for f in self.faults:
            if f.recovery is not None:
                by_kind.setdefault(f.kind, []).append(f.recovery)
        for kind, times in by_kind.items():
            times.sort()
            lines.append(
                f"  {kind}: n={len(times)} median {times[len(times) // 2]:.2f} max {times[-1]:.2f}"
            )
        if not self.faults or any(f.recovery is None for f in self.faults):
            lines.append(
                f"  never recovered: {[f.kind for f in self.faults if f.recovery is None]}"
            )
        lines += self.notes
        lines += self._stuck()
        lines.append(self.findings.report())
        lines.append(
            "log endings: " + ", ".join(f"{k} {n}" for k, n in self.findings.endings.items())
        )
        lines.append("CHECKS PASSED" if self.findings.ok else "CHECKS FAILED")
        return "\n".join(lines)

    def _stuck(self) -> list[str]:
        """Each request that never completed, with the fault it followed (the cause)."""
        lines = []
        for r in self.traffic.requests:
            if r.completed_at is not None or not r.attempts:
                continue
            start = r.attempts[0].started
            # The first fault after its first attempt began: what stranded it.
            later = [f for f in self.faults if f.at >= start]
            cause = min(later, key=lambda f: f.at) if later else None
            why = f"{cause.kind} {cause.detail} {cause.at - start:.1f} s in" if cause else "-"
            lines.append(f"  never completed: {r.key}, first fault during it: {why}")
        return lines


async def _kill_worker(rig: Rig, traffic: Traffic, slot: int, record: FaultRecord) -> None:
    """SIGKILL the worker while its upstream streams a reply a client is reading."""
    upstream = rig.upstreams[slot]

    def mid_stream() -> bool:
        reading = traffic.streaming_now()
        return any(
            r.outcome == "pending" and _last_user(r.body) in reading for r in upstream.requests
        )

    await _until(mid_stream, 60, "a client reading a stream of this worker")
    worker = rig.workers[slot]
    assert worker is not None
    record.at = time.monotonic()
    worker.kill()
    await asyncio.to_thread(rig.start_worker, slot)


def _last_user(body: object) -> str:
    if not isinstance(body, dict) or not body.get("messages"):
        return ""
    return str(body["messages"][-1].get("content")).partition(" :: ")[0]


async def _restart_node(rig: Rig, traffic: Traffic, record: FaultRecord) -> None:
    """Kill a node (the log's leader, every other time), then start it again once turns
    complete without it, and wait until it has caught up."""
    leader = await rig.cluster.leader_of("CHAT_EVENTS")
    node = leader if record.detail == "leader" else (leader + 1) % 3
    record.at = time.monotonic()
    await asyncio.to_thread(rig.cluster.kill_node, node)
    await traffic.wait_for_success_after(record.at)
    await asyncio.to_thread(rig.cluster.start_node, node)
    await rig.cluster.wait_until_healthy(timeout=120)
    record.detail = f"{record.detail} node {rig.cluster.name(node)}"


async def _restart_gateway(rig: Rig, index: int, record: FaultRecord) -> None:
    """A gateway stops as an operator stops it (SIGINT: drain), and comes back on its port."""
    gateway = rig.gateways[index]
    assert gateway is not None
    record.at = time.monotonic()
    await asyncio.to_thread(gateway.stop, 30)
    await asyncio.to_thread(rig.start_gateway, index)


async def _cut_worker(rig: Rig, slot: int, seconds: float, record: FaultRecord) -> None:
    """Cut a worker off NATS for `seconds`, and wait until it has reconnected."""
    worker = rig.workers[slot]
    assert worker is not None
    before = sum("nats.reconnected" in line for line in worker.lines)
    record.at = time.monotonic()
    rig.proxies[slot].cut(seconds)
    await _until(
        lambda: sum("nats.reconnected" in line for line in worker.lines) > before,
        seconds + 60,
        "the cut worker to reconnect",
        poll=lambda: _drain(worker),
    )


def _drain(worker: VeilProcess) -> None:
    """Read the worker's output lines that arrived (Child keeps what wait_for read)."""
    try:
        while True:
            worker.read_line(timeout=0.01)
    except AssertionError:
        pass


async def _until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    poll: Callable[[], None] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if poll is not None:
            await asyncio.to_thread(poll)
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what}")
        await asyncio.sleep(0.05)


def plan(worker_kills: int, nats_restarts: int, gateway_restarts: int, cuts: int) -> list[str]:
    """The faults in an interleaved order: the rarer kinds spread among worker kills."""
    others = ["nats_restart"] * nats_restarts + ["gateway_restart"] * gateway_restarts
    others += ["worker_cut"] * cuts
    kills = ["worker_kill"] * worker_kills
    order: list[str] = []
    step = max(1, len(kills) // (len(others) + 1))
    while kills or others:
        order += kills[:step]
        del kills[:step]
        if others:
            order.append(others.pop(0))
    return order


async def run_faults(
    rig: Rig,
    faults: Sequence[str],
    *,
    conversations: int = 4,
    steady_turns: int = 3,
    cut_seconds: float = 3.0,
    attempt_timeout: float = 20.0,
    give_up: float = 90.0,
    cli_replays: int = 2,
) -> Outcome:
    """Traffic, the faults one by one (each after `steady_turns` turns completed since the
    last one recovered), then every request finished, then the checks."""
    began = time.monotonic()
    traffic = Traffic(
        lambda: rig.urls,
        KEY,
        answer_for,
        conversations=conversations,
        attempt_timeout=attempt_timeout,
        give_up=give_up,
    )
    traffic.start()
    records: list[FaultRecord] = []
    notes: list[str] = []
    try:
        since = time.monotonic()
        for n, kind in enumerate(faults):
            await traffic.wait_for_completions(steady_turns, since)
            record = FaultRecord(kind, time.monotonic())
            records.append(record)
            if kind == "worker_kill":
                await _kill_worker(rig, traffic, n % 2, record)
            elif kind == "nats_restart":
                record.detail = "leader" if sum(r.kind == kind for r in records) % 2 else "follower"
                await _restart_node(rig, traffic, record)
            elif kind == "gateway_restart":
                await _restart_gateway(rig, n % 2, record)
            elif kind == "worker_cut":
                await _cut_worker(rig, n % 2, cut_seconds, record)
            else:
                raise ValueError(f"unknown fault {kind!r}")
            record.recovered_at = await traffic.wait_for_success_after(record.at)
            since = time.monotonic()
    finally:
        await traffic.stop()
    nc = await rig.cluster.connect()
    try:
        log = await read_log(nc, TENANT)
    finally:
        await nc.close()
    findings = await check_log(log, traffic.requests, rig.urls[0], AUDIT_KEY)
    env = {**CLEAN, "VEIL_NATS_URL": ",".join(rig.cluster.urls)}
    sample = sorted(log)[:cli_replays]
    await check_cli_replays(findings, sample, TENANT, rig.urls[0], AUDIT_KEY, env)
    return Outcome(traffic, records, findings, time.monotonic() - began, notes)
