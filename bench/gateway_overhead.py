"""Gateway overhead: the same chat calls straight to a zero-delay fake upstream and through Veil.

Starts the fake OpenAI upstream and `veil serve` (which spawns its own nats-server) as
separate processes, then drives both from this process with aiohttp at 1 and 16 concurrent
clients, non-streaming ("json") and streaming, side by side, and prints latency percentiles,
time to first token (TTFT), requests per second, the latency Veil adds, and the CPU each
process used. Every process shares this machine's cores, so the CPU columns also show what
else was running.

Every call sends its own message (the text ends in " #n"), as real traffic does: with one
fixed text, long-term memory's embeddings would all come from its cache.

Each cell makes a fixed number of calls unless it hits a time cap first (the table says so),
which keeps the whole run under about 3 minutes on 2 cores however fast Veil is. Between
cells the script waits until Veil and nats-server are idle: work Veil does after replying
(indexing turns into memory, for one) is shown as "busy after", not charged to the next cell.
A cell of 2,000 calls is a burst of about two seconds, during which memory indexing gives
way to the turns (up to `memory.max_lag`, 5 s). For sustained load, where indexing has to
run alongside, make the 16-client cells last 30 s (about 6 minutes in all):

    python bench/gateway_overhead.py --requests 1000 40000 --max-seconds 30 --no-breakdown

Run from the repository root (under ~3 minutes on 2 cores; --quick takes under a minute):

    python bench/gateway_overhead.py [--quick] [--requests 1000 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._stats import percentile
from testkit.procs import Child

MODEL = "veil"  # Veil's public model name
UPSTREAM_MODEL = "gpt-4o-mini"  # what Veil asks its upstream for by default
TARGET_ADDED_P50_MS = 2.0
TARGET_RPS = 1000.0
TARGETS = ("direct", "veil new", "veil cont.")
JSON_HEADERS = {"Content-Type": "application/json"}

_decode = msgspec.json.decode
_encode = msgspec.json.encode


# -- child processes ---------------------------------------------------------------------------


def spawn(
    name: str, cmd: list[str], env: dict[str, str], ready: re.Pattern[str], logs: Path
) -> tuple[Child, re.Match[str]]:
    """Start `cmd` and wait (30 s at most) for a stdout line matching `ready`."""
    # In the bench's process group, as before: a Ctrl-C reaches them too.
    child = Child(
        cmd, name=name, env=env, cwd=ROOT, stderr=logs / f"{name}.stderr", new_session=False
    )
    try:
        return child, child.wait_for(ready, timeout=30)
    except AssertionError:
        stop(child, timeout=5)
        tail = "\n".join(child.stderr_lines()[-20:])
        raise RuntimeError(
            f"{name} did not start (stdout {child.lines!r}); stderr tail:\n{tail}"
        ) from None


def stop(child: Child, timeout: float = 30.0) -> int:
    """SIGINT and wait: Veil drains and stops its own nats-server on SIGINT."""
    return child.stop(timeout, warn=lambda text: print(f"!! {text}", flush=True))


def veil_env(upstream_base: str, data_dir: str, config: str | None) -> dict[str, str]:
    """Our fake as the only upstream, no external NATS (so Veil spawns one), no API keys,
    and the config file given, if any."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("VEIL_", "OPENAI_", "ANTHROPIC_"))
    }
    env.update(OPENAI_BASE_URL=upstream_base, OPENAI_API_KEY="x", VEIL_DATA_DIR=data_dir)
    if config is not None:
        env["VEIL_CONFIG"] = str(Path(config).resolve())
    return env


# -- CPU accounting (Linux /proc) --------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def children_of(pid: int) -> dict[int, str]:
    """Direct children of pid and their names: the nats-server Veil spawned, and its
    helper processes (the memory projection's embedder)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            name = text.split("(", 1)[1].rsplit(")", 1)[0]
            ppid = int(text.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found[int(stat.parent.name)] = name
    return found


def machine_busy_seconds() -> float:
    """CPU time all cores have spent busy so far (not idle, not in I/O wait, not stolen)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = ticks[:7]
    return (user + nice + system + irq + softirq) / _TICK


def background_load(seconds: float = 1.0) -> float:
    """CPU % (of one core) the machine uses while this benchmark has not started yet."""
    before = machine_busy_seconds()
    time.sleep(seconds)
    return 100 * (machine_busy_seconds() - before) / seconds


class CpuMeter:
    """CPU % (of one core) of each process over an interval, plus "other": whatever else
    ran on the machine meanwhile, since it competes with the processes measured."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def _sample(self) -> dict[str, float]:
        now = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        if "veil" in self.pids:
            # Veil's helper processes (started when needed) count as Veil.
            now["veil"] += sum(
                cpu_seconds(pid)
                for pid, name in children_of(self.pids["veil"]).items()
                if name != "nats-server"
            )
        now["machine"] = machine_busy_seconds()
        return now

    def start(self) -> None:
        self._start = self._sample()
        self._t0 = time.perf_counter()

    def read(self) -> dict[str, float]:
        wall = time.perf_counter() - self._t0
        used = {k: 100 * (v - self._start[k]) / wall for k, v in self._sample().items()}
        machine = used.pop("machine")
        used["other"] = max(0.0, machine - sum(used.values()))
        return used


async def settle(pids: list[int], limit: float = 30.0) -> float:
    """Wait until these processes are idle (under 15% of a core for 0.3 s); seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        before = sum(cpu_seconds(pid) for pid in pids)
        await asyncio.sleep(0.3)
        if sum(cpu_seconds(pid) for pid in pids) - before < 0.3 * 0.15:
            break
    return time.perf_counter() - t0


# -- one chat call -----------------------------------------------------------------------------


class CallFailed(Exception):
    """A call that did not end in a 200 with the expected reply; the message says how."""


@dataclass
class Reply:
    latency_ms: float
    ttft_ms: float | None
    session_id: str | None


def chat_body(model: str, text: str, stream: bool, session_id: str | None = None) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    if session_id is not None:
        body["session_id"] = session_id
    return _encode(body)


async def chat(
    http: aiohttp.ClientSession, url: str, body: bytes, stream: bool, expect: str
) -> Reply:
    """POST one chat completion and check the reply text; raises CallFailed."""
    t0 = time.perf_counter()
    async with http.post(url, data=body, headers=JSON_HEADERS) as resp:
        if resp.status != 200:
            raise CallFailed(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        if stream:
            content, ttft, session, latency = await _read_sse(resp, t0)
        else:
            data = await resp.read()
            latency, ttft = time.perf_counter() - t0, None
            reply = _decode(data)
            content, session = reply["choices"][0]["message"]["content"], reply.get("session_id")
    if not content.startswith(expect):  # the echo of the message, which may end in " #n"
        raise CallFailed(f"unexpected reply {content[:80]!r}")
    return Reply(latency * 1e3, None if ttft is None else ttft * 1e3, session)


async def _read_sse(
    resp: aiohttp.ClientResponse, t0: float
) -> tuple[str, float | None, str | None, float]:
    """Text, TTFT, session id and time to [DONE] of an SSE body. It is read to its end:
    a half-read body makes aiohttp close the connection instead of reusing it."""
    parts: list[str] = []
    ttft: float | None = None
    done_at: float | None = None
    session: str | None = None
    async for line in resp.content:
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].rstrip()
        if payload == b"[DONE]":
            done_at = time.perf_counter() - t0
            continue
        chunk = _decode(payload)
        if "error" in chunk:
            raise CallFailed(f"error event in stream: {chunk['error']}")
        session = session or chunk.get("session_id")
        choices = chunk.get("choices") or []
        text = choices[0].get("delta", {}).get("content") if choices else None
        if text:
            if ttft is None:
                ttft = time.perf_counter() - t0
            parts.append(text)
    if done_at is None:
        raise CallFailed("stream ended without data: [DONE]")
    return "".join(parts), ttft, session, done_at


# -- a measured cell: one target, one mode, one concurrency ------------------------------------


def pct(samples: list[float], p: float) -> float | None:
    """The shared percentile (bench/_stats.py), rounded to µs; None without samples."""
    return round(percentile(samples, p), 3) if samples else None


@dataclass
class Cell:
    target: str  # one of TARGETS
    stream: bool
    clients: int
    latencies: list[float] = field(default_factory=list)  # ms, successful calls only
    ttfts: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    requested: int = 0
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core, by process
    busy_after: float = 0.0  # seconds Veil and nats-server stayed busy after the last reply

    @property
    def capped(self) -> bool:
        """Stopped by the time cap (or out of sessions) before making every requested call."""
        return self.ok + sum(self.errors.values()) < self.requested

    @property
    def mode(self) -> str:
        return "stream" if self.stream else "json"

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.ok / self.wall if self.wall else 0.0

    def cpu_ms_per_call(self, process: str) -> float | None:
        """CPU time one call cost `process`; 1000 / this bounds its req/s on one core."""
        if process not in self.cpu or not self.ok:
            return None
        return round(self.cpu[process] / 100 * self.wall / self.ok * 1e3, 3)

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "stream": self.stream,
            "clients": self.clients,
            "requested": self.requested,
            "ok": self.ok,
            "errors": dict(self.errors),
            "wall_s": round(self.wall, 3),
            "busy_after_s": round(self.busy_after, 2),
            "rps": round(self.rps, 1),
            "p50_ms": pct(self.latencies, 50),
            "p99_ms": pct(self.latencies, 99),
            "ttft_p50_ms": pct(self.ttfts, 50),
            "ttft_p99_ms": pct(self.ttfts, 99),
            "cpu_percent": {k: round(v, 1) for k, v in self.cpu.items()},
            "veil_cpu_ms_per_call": self.cpu_ms_per_call("veil"),
            "nats_cpu_ms_per_call": self.cpu_ms_per_call("nats"),
        }


BodyFor = Callable[[int], bytes | None]  # worker index -> request body; None: stop
OnReply = Callable[[int, Reply], None]


async def drive(
    http: aiohttp.ClientSession,
    url: str,
    stream: bool,
    expect: str,
    clients: int,
    requests: int,
    seconds: float,
    body_for: BodyFor,
    cell: Cell,
    on_reply: OnReply | None = None,
) -> None:
    """`clients` workers share `requests` calls, starting none after `seconds`;
    timings and failures go to `cell`."""
    remaining = requests
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < deadline:
            body = body_for(w)
            if body is None:
                return
            remaining -= 1
            try:
                reply = await chat(http, url, body, stream, expect)
            except (
                CallFailed,
                aiohttp.ClientError,
                TimeoutError,
                msgspec.DecodeError,
                KeyError,
                IndexError,
                TypeError,
            ) as error:
                cell.errors[_reason(error)] += 1
                continue
            if on_reply is not None:
                on_reply(w, reply)
            cell.latencies.append(reply.latency_ms)
            if reply.ttft_ms is not None:
                cell.ttfts.append(reply.ttft_ms)

    await asyncio.gather(*(worker(w) for w in range(clients)))


def _reason(error: BaseException) -> str:
    """A failure's summary with ids masked, so equal failures count together."""
    text = str(error) if isinstance(error, CallFailed) else f"{type(error).__name__}: {error}"
    return re.sub(r"(sess_)?[0-9a-f]{32}", "<id>", text)[:240]


class Conversations:
    """Pre-opened sessions, each continued by one worker for `turns` turns, then the next.

    A worker owns its sessions: a real multi-turn client does not send two turns of one
    conversation at once (Veil would queue the second behind the first)."""

    def __init__(self, session_ids: list[str], turns: int) -> None:
        self._free = list(reversed(session_ids))
        self._turns = turns
        self._current: dict[int, tuple[str, int]] = {}

    def next_for(self, worker: int) -> str | None:
        session, used = self._current.get(worker, ("", self._turns))
        if used >= self._turns:
            if not self._free:
                return None
            session, used = self._free.pop(), 0
        self._current[worker] = (session, used + 1)
        return session


@dataclass
class Setup:
    direct_url: str
    veil_url: str
    message: str
    vary: bool  # a different message each call, as real traffic (no embedding cache hits)
    turns: int
    warmup: int
    max_seconds: float  # time cap of one cell
    cpu: CpuMeter
    veil_turns: Counter[str] = field(default_factory=Counter)  # successful turns by kind
    samples: dict[str, str] = field(default_factory=dict)  # kind -> a session id, for events

    @property
    def busy_pids(self) -> list[int]:
        """Veil and everything it started: nats-server, helper processes."""
        veil = self.cpu.pids["veil"]
        return [veil, *children_of(veil)]

    _sent: int = 0

    @property
    def expect(self) -> str:
        return f"echo: {self.message}"

    def text(self) -> str:
        """The next call's message."""
        if not self.vary:
            return self.message
        self._sent += 1
        return f"{self.message} #{self._sent}"


def new_http(clients: int) -> aiohttp.ClientSession:
    # One pooled keep-alive connection per client; no cookie jar, to keep the client lean.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=clients),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=60),
    )


async def measure(
    setup: Setup, target: str, stream: bool, clients: int, requests: int, rate: float | None
) -> Cell:
    """Warm up, then time `requests` calls at `clients` concurrency against one target.
    `rate`: the req/s expected, to open just enough sessions for continuing them."""
    cell = Cell(target, stream, clients, requested=requests)
    url = setup.direct_url if target == "direct" else setup.veil_url
    async with new_http(clients) as http:
        if target == "veil cont.":
            # Sessions for the calls the time cap allows at the new-session rate, and a margin.
            calls = min(requests, math.ceil(rate * setup.max_seconds * 1.5)) if rate else requests
            body_for, on_reply = await _continue_sessions(setup, http, stream, clients, calls, cell)
        else:
            model = UPSTREAM_MODEL if target == "direct" else MODEL
            body_for, on_reply = (lambda _w: chat_body(model, setup.text(), stream)), None
            if target == "veil new":
                on_reply = _keep(setup, "new")
            warm = Cell("warm-up", stream, clients)
            await drive(
                http,
                url,
                stream,
                setup.expect,
                clients,
                setup.warmup,
                3.0,
                body_for,
                warm,
                on_reply,
            )
            cell.errors.update({f"warm-up: {k}": v for k, v in warm.errors.items()})
        await settle(setup.busy_pids)
        setup.cpu.start()
        t0 = time.perf_counter()
        await drive(
            http,
            url,
            stream,
            setup.expect,
            clients,
            requests,
            setup.max_seconds,
            body_for,
            cell,
            on_reply,
        )
        cell.wall = time.perf_counter() - t0
        cell.cpu = setup.cpu.read()
    cell.busy_after = await settle(setup.busy_pids)
    return cell


def _keep(setup: Setup, kind: str) -> OnReply:
    """Count a successful Veil turn of this kind and keep its session as a sample."""

    def keep(_w: int, reply: Reply) -> None:
        setup.veil_turns[kind] += 1
        if reply.session_id:
            setup.samples[kind] = reply.session_id

    return keep


async def _continue_sessions(
    setup: Setup,
    http: aiohttp.ClientSession,
    stream: bool,
    clients: int,
    calls: int,
    cell: Cell,
) -> tuple[BodyFor, OnReply]:
    """Open enough sessions for `calls` turns (untimed; this is the warm-up too)."""
    opened: list[str] = []
    needed = math.ceil(calls / setup.turns) + clients + 1

    def keep(_w: int, reply: Reply) -> None:
        setup.veil_turns["new"] += 1
        if reply.session_id:
            opened.append(reply.session_id)

    opening = Cell("opening", False, clients)
    await drive(
        http,
        setup.veil_url,
        False,
        setup.expect,
        max(clients, 8),
        needed,
        math.inf,
        lambda _w: chat_body(MODEL, setup.text(), False),
        opening,
        keep,
    )
    # Failures to open are reported with the cell, labelled, outside its percentiles.
    cell.errors.update({f"opening a session: {k}": v for k, v in opening.errors.items()})
    convos = Conversations(opened, setup.turns)

    def body_for(w: int) -> bytes | None:
        session = convos.next_for(w)
        return None if session is None else chat_body(MODEL, setup.text(), stream, session)

    return body_for, _keep(setup, "continued")


async def run_cells(setup: Setup, requests: dict[int, int]) -> list[Cell]:
    """Every cell, direct and Veil side by side for each mode and concurrency."""
    cells: list[Cell] = []
    await settle(setup.busy_pids)
    for stream in (False, True):
        for clients, n in requests.items():
            for target in TARGETS:
                rate = cells[-1].rps if target == "veil cont." else None  # of "veil new"
                cell = await measure(setup, target, stream, clients, n, rate)
                print(
                    f"  {target:<11} {cell.mode:<6} c={clients:<3} {cell.ok:>5} ok "
                    f"{sum(cell.errors.values())} errors in {cell.wall:5.1f} s"
                    + (" (stopped early)" if cell.capped else "")
                    + (
                        f"; Veil busy {cell.busy_after:.1f} s after"
                        if cell.busy_after > 0.5
                        else ""
                    ),
                    flush=True,
                )
                cells.append(cell)
    return cells


# -- breakdown: Veil's NATS round trips and its engine call on their own -----------------------


async def timed(n: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    """Run `call` n times in sequence; milliseconds each."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


async def probe_nats(url: str, n: int) -> dict[str, list[float]]:
    """Round trips against Veil's own nats-server, from this process, with Veil idle."""
    import nats
    from nats.js.api import StorageType, StreamConfig

    from eventstore.jetstream import JetStreamEventStore

    nc = await nats.connect(url, name="bench-probe")
    js = nc.jetstream()
    out: dict[str, list[float]] = {}
    try:

        async def echo(msg: Any) -> None:
            await msg.respond(msg.data)

        await nc.subscribe("bench.echo", cb=echo)
        payload = b"x" * 300  # about a StartTurn's size
        out["nats request-reply"] = await timed(
            n, lambda: nc.request("bench.echo", payload, timeout=5)
        )

        # A file stream like CHAT_EVENTS; each publish waits for its ack and carries the
        # expected-last-subject-sequence check that Veil's appends carry.
        await js.add_stream(
            StreamConfig(
                name="BENCH_PROBE",
                subjects=["bench.probe.>"],
                storage=StorageType.FILE,
                allow_direct=True,
                allow_atomic=True,
            )
        )
        last = 0

        async def publish() -> None:
            nonlocal last
            ack = await js.publish(
                "bench.probe.s",
                payload,
                stream="BENCH_PROBE",
                headers={"Nats-Expected-Last-Subject-Sequence": str(last)},
            )
            last = ack.seq

        out["jetstream publish+ack"] = await timed(n, publish)

        async def atomic_pair() -> None:
            # Two messages stored all or none (nats-server 2.12+): only the commit is acked.
            nonlocal last
            batch = {"Nats-Batch-Id": uuid.uuid4().hex}
            await nc.publish(
                "bench.probe.s",
                payload,
                headers={
                    **batch,
                    "Nats-Batch-Sequence": "1",
                    "Nats-Expected-Last-Subject-Sequence": str(last),
                },
            )
            reply = await nc.request(
                "bench.probe.s",
                payload,
                timeout=5,
                headers={**batch, "Nats-Batch-Sequence": "2", "Nats-Batch-Commit": "1"},
            )
            last = int(msgspec.json.decode(reply.data)["seq"])  # KeyError: refused

        with contextlib.suppress(KeyError):  # a server without atomic batches
            out["jetstream atomic batch of 2"] = await timed(n, atomic_pair)
        store = JetStreamEventStore(js, nc)
        out["direct get (empty session load)"] = await timed(
            n, lambda: store.load("local", "bench_no_such_session")
        )
        await js.delete_stream("BENCH_PROBE")
    finally:
        await nc.drain()
    return out


def engine_key(messages: int) -> str:
    return f"engine call, {messages} message{'s' if messages > 1 else ''}"


SDK_KEY = "openai SDK call, 1 message"


async def probe_engine(base_url: str, message: str, n: int, history: int) -> dict[str, list[float]]:
    """Veil's OpenAI-compatible engine against the fake upstream, called as the model actor
    calls it, with one message (a new session) and with `history` messages (a continued
    session's mean); and the openai SDK making the one-message call, for comparison."""
    import openai

    from actors.engines.base import EngineOutput
    from actors.engines.openai_compat import OpenAIEngine
    from eventstore.events import ChatMessage

    engine = OpenAIEngine("bench", base_url=base_url, api_key="x", timeout=30)
    sdk = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
    one = [ChatMessage(role="user", content=message)]
    many = [
        ChatMessage(role="assistant" if i % 2 else "user", content=message) for i in range(history)
    ]

    def complete(messages: list[ChatMessage]) -> Callable[[], Awaitable[object]]:
        return lambda: engine.generate(UPSTREAM_MODEL, messages, {}, None, EngineOutput())

    async def ignore(_: object) -> None:
        return None

    def sdk_call() -> Awaitable[object]:
        return sdk.chat.completions.create(
            model=UPSTREAM_MODEL, messages=[{"role": "user", "content": message}]
        )

    try:
        await timed(50, complete(one))  # warm-up
        await timed(50, sdk_call)
        return {
            engine_key(1): await timed(n, complete(one)),
            engine_key(history): await timed(n, complete(many)),
            "engine stream, 1 message": await timed(
                n, lambda: engine.generate(UPSTREAM_MODEL, one, {}, ignore, EngineOutput())
            ),
            SDK_KEY: await timed(n, sdk_call),
        }
    finally:
        await engine.aclose()
        await sdk.close()


async def probe_recall(url: str, message: str, n: int) -> list[float] | None:
    """Veil's memory recall (embed the query, search the index) asked directly, as a session
    actor asks it; None when this Veil has no memory actor (or no such API any more)."""
    import nats
    from nats.errors import NoRespondersError

    try:
        from bus.subjects import MEMORY_RECALL
        from contracts.memory import RECALL_CODEC, RecallRequest
    except ImportError:
        return None
    ask = RECALL_CODEC.encode(
        RecallRequest(tenant="local", session_id="bench_probe", query=message, k=8)
    )
    nc = await nats.connect(url, name="bench-recall")
    try:
        return await timed(n, lambda: nc.request(MEMORY_RECALL, ask, timeout=10))
    except NoRespondersError:
        return None
    finally:
        await nc.drain()


async def log_facts(url: str, samples: dict[str, str]) -> tuple[int, dict[str, Counter[str]]]:
    """Events stored in all, and the events of one turn by type, read back from sample
    sessions: a new session's first turn, and a continued session's later turns (averaged)."""
    import nats

    from bus.subjects import EVENTS_STREAM
    from eventstore.jetstream import JetStreamEventStore

    nc = await nats.connect(url, name="bench-log")
    per_turn: dict[str, Counter[str]] = {}
    try:
        js = nc.jetstream()
        stored = (await js.stream_info(EVENTS_STREAM)).state.messages
        store = JetStreamEventStore(js, nc)

        async def kinds_of(session_id: str) -> Counter[str]:
            # Without keys, every session is the anonymous caller's, tenant "local".
            return Counter(type(e.event).__name__ for e in await store.load("local", session_id))

        if "new" in samples:
            per_turn["new"] = await kinds_of(samples["new"])
        if "continued" in samples and "new" in per_turn:
            kinds = await kinds_of(samples["continued"])
            turns = kinds["TurnStarted"]
            later = kinds - per_turn["new"]  # its first turn was a new-session turn
            per_turn["continued"] = Counter(
                {k: round(v / max(1, turns - 1), 2) for k, v in later.items()}
            )
    finally:
        await nc.drain()
    return stored, per_turn


# -- report ------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def machine() -> dict[str, Any]:
    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    from veil.natsserver import find_binary

    nats_server = subprocess.run(
        [find_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    return {
        "commit": _git_commit(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "aiohttp": ver("aiohttp"),
        "nats-py": ver("nats-py"),
        "openai": ver("openai"),
        "msgspec": ver("msgspec"),
        "nats-server": nats_server,
        "veil": ver("veil"),
    }


def _git_commit() -> str:
    """The commit measured, "+changes" when tracked files differ from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" +changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def print_cells(cells: list[Cell]) -> None:
    print(
        f"{'target':<11} {'mode':<6} {'clients':>7} {'ok':>6} {'errors':>6} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'TTFT p50':>8} {'TTFT p99':>8} {'req/s':>6}  "
        f"CPU % of a core: load/upstream/veil/nats/other (sum)  CPU ms/call: veil nats"
        f"  busy after s"
    )
    for c in cells:
        cpu = "/".join(
            f"{c.cpu.get(k, 0):.0f}" for k in ("load", "upstream", "veil", "nats", "other")
        )
        print(
            f"{c.target:<11} {c.mode:<6} {c.clients:>7} {c.ok:>6} {sum(c.errors.values()):>6} "
            f"{fmt(pct(c.latencies, 50)):>7} {fmt(pct(c.latencies, 99)):>7} "
            f"{fmt(pct(c.ttfts, 50)):>8} {fmt(pct(c.ttfts, 99)):>8} {c.rps:>6.0f}  "
            f"{cpu:>27} ({sum(c.cpu.values()):>3.0f})  "
            f"{fmt(c.cpu_ms_per_call('veil')):>16} {fmt(c.cpu_ms_per_call('nats')):>4}"
            f"  {c.busy_after:>12.1f}{'  (stopped early)' if c.capped else ''}"
        )


def print_errors(cells: list[Cell]) -> dict[str, dict[str, int]]:
    errors = {f"{c.target} {c.mode} c={c.clients}": dict(c.errors) for c in cells if c.errors}
    print("\nerrors and non-200 responses: " + ("none" if not errors else ""))
    for where, counts in errors.items():
        for reason, count in counts.items():
            print(f"  {where}: {count} x {reason}")
    return errors


def _diff(a: list[float], b: list[float], p: float) -> float | None:
    pa, pb = pct(a, p), pct(b, p)
    return None if pa is None or pb is None else round(pa - pb, 3)


def added(cells: list[Cell]) -> list[dict[str, Any]]:
    """Veil minus direct, per mode, concurrency and session variant."""
    direct = {(c.stream, c.clients): c for c in cells if c.target == "direct"}
    rows = []
    for c in cells:
        d = direct.get((c.stream, c.clients))
        if c.target == "direct" or d is None or not c.ok or not d.ok:
            continue
        rows.append(
            {
                "variant": c.target,
                "stream": c.stream,
                "clients": c.clients,
                "added_p50_ms": _diff(c.latencies, d.latencies, 50),
                "added_p99_ms": _diff(c.latencies, d.latencies, 99),
                "added_ttft_p50_ms": _diff(c.ttfts, d.ttfts, 50) if c.stream else None,
                "added_ttft_p99_ms": _diff(c.ttfts, d.ttfts, 99) if c.stream else None,
                "veil_rps": round(c.rps, 1),
                "direct_rps": round(d.rps, 1),
            }
        )
    return rows


def print_added(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'variant':<11} {'mode':<6} {'clients':>7} {'added p50':>9} {'added p99':>9} "
        f"{'+TTFT p50':>9} {'+TTFT p99':>9} {'veil req/s':>10} {'direct req/s':>12}"
    )
    for r in rows:
        print(
            f"{r['variant']:<11} {'stream' if r['stream'] else 'json':<6} {r['clients']:>7} "
            f"{fmt(r['added_p50_ms']):>9} {fmt(r['added_p99_ms']):>9} "
            f"{fmt(r['added_ttft_p50_ms']):>9} {fmt(r['added_ttft_p99_ms']):>9} "
            f"{r['veil_rps']:>10.0f} {r['direct_rps']:>12.0f}"
        )


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        where = f"({r['variant']}, {'stream' if r['stream'] else 'json'})"
        if r["clients"] == 1:
            # Streaming: the latency a user feels is the first token's.
            value = r["added_ttft_p50_ms"] if r["stream"] else r["added_p50_ms"]
            what = "added TTFT p50" if r["stream"] else "added p50"
            out.append(
                {
                    "target": f"{what} < {TARGET_ADDED_P50_MS:g} ms at 1 client {where}",
                    "value": value,
                    "unit": "ms",
                    "met": value is not None and value < TARGET_ADDED_P50_MS,
                }
            )
        else:
            out.append(
                {
                    "target": f"> {TARGET_RPS:,.0f} req/s through Veil at {r['clients']} "
                    f"clients {where}",
                    "value": r["veil_rps"],
                    "unit": "req/s",
                    "met": r["veil_rps"] > TARGET_RPS,
                }
            )
    return out


def print_targets(checks: list[dict[str, Any]], cells: list[Cell]) -> None:
    print("\ntargets")
    for t in checks:
        value = fmt(t["value"], 2 if t["unit"] == "ms" else 0)
        print(f"  {'MET   ' if t['met'] else 'MISSED'} {t['target']}: {value} {t['unit']}")
    for c in cells:
        ms = c.cpu_ms_per_call("veil")
        if c.target == "veil new" and not c.stream and c.clients > 1 and ms:
            print(
                f"  Veil's process spent {ms:.2f} ms of CPU per call ({c.mode}, {c.clients} "
                f"clients): one Veil process tops out near {1000 / ms:,.0f} req/s"
            )
    cores = 100 * len(os.sched_getaffinity(0))
    saturated = [c for c in cells if sum(c.cpu.values()) > 0.9 * cores]
    if saturated:
        print(f"  note: all cores >90% busy in {len(saturated)} of {len(cells)} cells")
    busy = [c for c in cells if c.cpu.get("other", 0) > 10]
    if busy:
        print(
            f"  note: other programs used >10% of a core in {len(busy)} of {len(cells)} cells "
            f"(up to {max(c.cpu['other'] for c in busy):.0f}%): those figures are pessimistic"
        )


def print_breakdown(
    probes: dict[str, list[float]],
    per_turn: dict[str, Counter[str]],
    cells: list[Cell],
    history: int,
) -> dict[str, Any]:
    p50 = {name: pct(samples, 50) or 0.0 for name, samples in probes.items()}
    for name, samples in probes.items():
        print(
            f"  {name:<36} p50 {fmt(pct(samples, 50), 3):>7} ms   "
            f"p99 {fmt(pct(samples, 99), 3):>7} ms"
        )
    by = {(c.target, c.stream, c.clients): c for c in cells}
    direct = pct(by[("direct", False, 1)].latencies, 50) or 0.0
    engine_extra = p50[engine_key(1)] - direct
    sdk_extra = p50[SDK_KEY] - direct
    print(
        f"  Veil's engine call adds {engine_extra:.3f} ms to the load generator's bare aiohttp "
        f"call (1 message, 1 client); the openai SDK would add {sdk_extra:.3f} ms"
    )
    rr, js = p50["nats request-reply"], p50["jetstream publish+ack"]
    # The critical path of a json turn (actors/session_actor.py): gateway -> session request,
    # session -> model request, and each event appended by its own publish waiting for its
    # ack, all before the reply goes out. A new session's log is known to be empty, so it is
    # not read; a continued one sends its history upstream; a turn that recalled asked memory.
    result: dict[str, Any] = {
        "p50_ms": p50,
        "engine_overhead_ms": round(engine_extra, 3),
        "sdk_overhead_ms": round(sdk_extra, 3),
    }
    for kind, variant in (("new", "veil new"), ("continued", "veil cont.")):
        events = per_turn.get(kind)
        cell = by.get((variant, False, 1))
        seen = pct(cell.latencies, 50) if cell else None
        if not events or seen is None:
            continue
        count = sum(events.values())
        recall = "MemoryRecalled" in events and "memory recall" in p50
        call = engine_key(1 if kind == "new" else history)
        floor = 2 * rr + count * js + p50[call]
        floor += p50["memory recall"] if recall else 0
        listed = ", ".join(f"{k} x{v:g}" if v != 1 else k for k, v in sorted(events.items()))
        print(f"  a {kind} turn appends {count:g} events: {listed}")
        print(
            f"    json, 1 client, at least: 2 request-replies"
            f"{' + 1 memory recall' if recall else ''} + {count:g} plain publishes + "
            f"{call} = {floor:.2f} ms in sequence;\n"
            f"    measured p50 {seen:.2f} ms, {seen - floor:.2f} ms above that floor: Veil's own "
            f"Python work (HTTP, JSON, actors) and waiting for its busy event loop"
        )
        result[kind] = {
            "events": dict(events),
            "floor_ms": round(floor, 3),
            "measured_p50_ms": seen,
        }
    return result


_BAD_LINE = re.compile(
    r'\[(warning|error|critical)\s*\]|"level":"(warning|error|critical)"|Traceback|Error'
)


def print_stderr(children: list[Child]) -> dict[str, list[str]]:
    """Warnings, errors and tracebacks the children logged: shown, never hidden."""
    found: dict[str, list[str]] = {}
    for child in children:
        lines = child.stderr_lines()
        # Console lines ("[warning ]") and JSON ones ("level":"warning").
        bad = [ln for ln in lines if _BAD_LINE.search(ln)]
        found[child.name] = bad
        print(f"  {child.name}: {len(lines)} stderr lines, {len(bad)} warning/error lines")
        shown = lines if len(lines) <= 10 else bad[:10]  # a short log is shown whole
        for ln in shown:
            print(f"    {ln[:300]}")
        if len(lines) > 10 and len(bad) > 10:
            print(f"    ... and {len(bad) - 10} more")
    return found


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--requests",
        type=int,
        nargs=2,
        metavar=("C1", "C16"),
        help="measured calls per cell at 1 and at 16 clients (default 1000 2000)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        help="time cap of one cell: no call starts after it (default 12)",
    )
    p.add_argument(
        "--warmup", type=int, help="untimed calls before each cell, 3 s at most (default 100)"
    )
    p.add_argument(
        "--turns",
        type=int,
        default=10,
        help="turns per session when continuing sessions: bounds the history",
    )
    p.add_argument(
        "--message",
        default="hello from the benchmark",
        help="every call's message, followed by ' #n' (the call's number) unless --fixed-message",
    )
    p.add_argument(
        "--fixed-message",
        action="store_true",
        help="send the message as it is every time: Veil's embedding cache then "
        "answers for long-term memory, which real traffic does not allow",
    )
    p.add_argument(
        "--quick", action="store_true", help="200/400 calls per cell, 4 s cap, 50 warm-up calls"
    )
    p.add_argument(
        "--veil-config",
        metavar="FILE",
        help="Veil config file to run with, e.g. one with [memory] enabled = false "
        "(default: none, Veil's defaults)",
    )
    p.add_argument("--no-breakdown", action="store_true", help="skip the NATS and engine probes")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-': stdout)")
    args = p.parse_args(argv)
    args.requests = args.requests or ([200, 400] if args.quick else [1000, 2000])
    if args.max_seconds is None:
        args.max_seconds = 4.0 if args.quick else 12.0
    if args.warmup is None:
        args.warmup = 50 if args.quick else 100
    return args


async def run(
    setup: Setup, requests: dict[int, int], upstream_base: str, nats_url: str, breakdown: bool
) -> dict[str, Any]:
    print(
        "\nrunning (direct: aiohttp straight to the fake upstream; veil new: a new session "
        "per call; veil cont.: continuing sessions)"
    )
    cells = await run_cells(setup, requests)
    print(
        "\nresults (latency: to the full response or [DONE]; TTFT: to the first non-empty "
        "content delta; failed calls are not in the percentiles; stopped early: the cell hit "
        "its time cap, or ran out of opened sessions)"
    )
    print_cells(cells)
    errors = print_errors(cells)
    rows = added(cells)
    print("\nadded by Veil (Veil minus direct, same mode and clients; ms)")
    print_added(rows)
    checks = targets(rows)
    print_targets(checks, cells)
    results: dict[str, Any] = {
        "cells": [c.summary() for c in cells],
        "errors": errors,
        "added": rows,
        "targets": checks,
    }

    stored, per_turn = await log_facts(nats_url, setup.samples)
    turns = setup.veil_turns
    total = turns["new"] + turns["continued"]
    print(
        f"\nevents in CHAT_EVENTS: {stored:,} for {total:,} successful Veil turns "
        f"({turns['new']:,} new-session, {turns['continued']:,} continued): "
        f"{stored / max(1, total):.2f} per turn"
    )
    results["events"] = {
        "stored": stored,
        "turns": dict(turns),
        "per_turn": {k: dict(v) for k, v in per_turn.items()},
    }
    if breakdown:
        print(
            "\nbreakdown (sequential calls from this process, Veil idle; n=1000 for NATS, "
            "500 for the engine and the SDK, 200 for memory)"
        )
        await settle(setup.busy_pids)
        probes = await probe_nats(nats_url, 1000)
        recall = await probe_recall(nats_url, setup.message, 200)
        if recall is not None:
            probes["memory recall"] = recall
        # Continued turn k (1..turns) sends 2k+1 messages upstream: turns+2 on average.
        history = setup.turns + 2
        probes.update(await probe_engine(upstream_base, setup.message, 500, history))
        results["breakdown"] = print_breakdown(probes, per_turn, cells, history)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine()
    print(
        f"machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"{info['platform']}"
    )
    print(f"veil code: commit {info['commit']}; config: {args.veil_config or 'defaults'}")
    print(
        f"versions: aiohttp {info['aiohttp']}, nats-py {info['nats-py']}, openai "
        f"{info['openai']}, msgspec {info['msgspec']}, {info['nats-server']}, "
        f"veil {info['veil']}"
    )
    idle = background_load()
    print(
        f"before starting, other programs used {idle:.0f}% of a core"
        + (" (the machine is busy: expect slower figures)" if idle > 10 else "")
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="veil-bench-") as tmp:
        logs = Path(tmp)
        upstream, m = spawn(
            "upstream",
            [sys.executable, "-m", "testkit.upstreams", "openai", "--port", "0"],
            dict(os.environ),
            re.compile(r"listening on (http://\S+)"),
            logs,
        )
        base = m.group(1) + "/v1"
        veil: Child | None = None
        try:
            veil, m = spawn(
                "veil",
                [sys.executable, "-m", "veil.cli", "serve", "--port", "0"],
                veil_env(base, str(logs / "data"), args.veil_config),
                re.compile(r"Veil listening on http://127\.0\.0\.1:(\d+)/v1"),
                logs,
            )
            nats_url = (logs / "data" / "nats.url").read_text().strip()
            pids = {"load": os.getpid(), "upstream": upstream.proc.pid, "veil": veil.proc.pid}
            for pid, name in children_of(veil.proc.pid).items():
                if name == "nats-server":
                    pids["nats"] = pid
            setup = Setup(
                direct_url=f"{base}/chat/completions",
                veil_url=f"http://127.0.0.1:{m.group(1)}/v1/chat/completions",
                message=args.message,
                vary=not args.fixed_message,
                turns=args.turns,
                warmup=args.warmup,
                max_seconds=args.max_seconds,
                cpu=CpuMeter(pids),
            )
            print(
                f"upstream {base} (pid {upstream.proc.pid}); veil {setup.veil_url} "
                f"(pid {veil.proc.pid}); nats {nats_url} (pid {pids.get('nats', '?')})"
            )
            print(
                f"calls per cell: {args.requests[0]} at 1 client, {args.requests[1]} at 16, "
                f"{args.max_seconds:g} s at most, after {args.warmup} warm-up calls; "
                f"message {args.message!r}{' + #n' if not args.fixed_message else ''}; continued sessions: {args.turns} turns each "
                f"(upstream gets 3..{2 * args.turns + 1} messages)"
            )
            requests = {1: args.requests[0], 16: args.requests[1]}
            results = asyncio.run(run(setup, requests, base, nats_url, not args.no_breakdown))
        finally:
            code = stop(veil) if veil is not None else None
            stop(upstream)
        last = veil.lines[-1] if veil is not None and veil.lines else "-"
        print(f"\nveil exited with {code}; its last line: {last}")
        print("children's stderr")
        results["stderr"] = print_stderr([c for c in (upstream, veil) if c is not None])
    results["machine"] = {**info, "background_cpu_percent": round(idle, 1)}
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(f"\ntotal run time {results['elapsed_s']:.0f} s")
    if args.json:
        text = msgspec.json.format(_encode(results), indent=2).decode()
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
