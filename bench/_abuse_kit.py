"""The machinery of bench/abuse.py: Veil processes, the probing clients, raw HTTP, the rows.

A scenario runs on a `Stage`: a fresh `veil serve` (its own data directory, and a config file
when the scenario needs one), a health prober and a bystander chatting on its own session,
each in a process of its own (bench/_abuse_probe.py). The stage measures an idle baseline,
marks when the abuse starts and ends, and turns the probes' samples into the row's health
and bystander figures. Everything the bench starts is registered with a `Reaper`, which
stops it on the way out, Ctrl-C and exceptions included, and also ends what those processes
left behind (a nats-server, tool workers) by their recorded pid and start time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from bench._stats import percentile
from testkit.procs import Child, VeilProcess, processes_mentioning, run_veil

__all__ = [
    "PATIENCE",
    "Answer",
    "Client",
    "Reaper",
    "Row",
    "Stage",
    "Stats",
    "clean_environment",
    "exchange",
    "http_request",
    "pct",
    "raise_open_files",
    "replay",
    "request_bytes",
]

BENCH = Path(__file__).resolve().parent
# A request that takes longer than this is a hang (the definition).
PATIENCE = 30.0
# A health check or a bystander's chat taking this long is a stall (they take milliseconds).
STALL = 1.0
_ERROR_LINE = re.compile(r"\[(?:error|critical)\s*\] (\S+)")
LISTENING = r"Veil listening on http://127\.0\.0\.1:(\d+)/v1"


def clean_environment() -> None:
    """Keep the developer's upstreams, keys and Veil settings out of every child (the cache
    of built models stays: it only saves time)."""
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "ANTHROPIC_", "VEIL_")) and name != "VEIL_CACHE_DIR":
            del os.environ[name]


def raise_open_files() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def pct(samples: list[float], p: float) -> float | None:
    """The shared percentile (bench/_stats.py); None without samples."""
    return percentile(samples, p) if samples else None


# -- processes ---------------------------------------------------------------------------------


def _start_time(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> dict[int, int]:
    """Every process below pid, with its start time (so a reused pid is never mistaken)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found: dict[int, int] = {}
    todo = list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        started = _start_time(child)
        if started is not None:
            found[child] = started
        todo.extend(parents.get(child, []))
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie nobody reaped."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


class Reaper:
    """Whatever the bench started, stopped on the way out whatever happens."""

    def __init__(self) -> None:
        self.veils: list[VeilProcess] = []
        self.helpers: list[Child] = []
        self.strays: dict[int, int] = {}  # pid -> start time, seen under a Veil process

    def watch(self, veil: VeilProcess) -> None:
        self.veils.append(veil)
        self.note_children(veil)

    def note_children(self, veil: VeilProcess) -> None:
        if veil.proc.poll() is None:
            self.strays.update(descendants(veil.proc.pid))

    def helper(self, cmd: list[str]) -> Child:
        # In a session of its own (the default): Ctrl-C reaches the bench only; it stops them.
        child = Child(cmd, stdin=True, stderr=subprocess.DEVNULL)
        self.helpers.append(child)
        return child

    def stop_veil(self, veil: VeilProcess, graceful: bool = True) -> None:
        self.note_children(veil)
        if graceful:
            veil.stop(30, warn=lambda text: print(f"  ! {text}", file=sys.stderr))
        veil.kill()
        self.end_strays()

    def end_strays(self, patience: float = 5.0) -> None:
        """Give what Veil left behind a moment to follow it (nats-server stops on its
        parent's death), then SIGKILL the rest, by pid and start time."""
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            left = {p: s for p, s in self.strays.items() if alive(p) and _start_time(p) == s}
            if not left:
                break
            time.sleep(0.05)
        for pid, started in self.strays.items():
            if alive(pid) and _start_time(pid) == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self.strays.clear()

    def reap(self) -> None:
        for child in self.helpers:
            child.kill()
        for veil in self.veils:
            self.stop_veil(veil)
        self.end_strays()


# -- the probing clients -----------------------------------------------------------------------


@dataclass
class Stats:
    """Calls in a window: p50 (answered ones) and worst seconds, and how many failed."""

    calls: int
    p50: float | None
    worst: float | None
    failures: int


class Client:
    """A bench/_abuse_probe.py process; `finish()` returns its samples."""

    def __init__(self, reaper: Reaper, mode: str, port: int, interval: float, **opts: str):
        cmd = [sys.executable, str(BENCH / "_abuse_probe.py"), mode, str(port)]
        cmd += ["--interval", str(interval)]
        for name, value in opts.items():
            cmd += [f"--{name}", value]
        self.child = reaper.helper(cmd)
        try:
            self.child.wait_for(r"^ready$", timeout=2 * PATIENCE)
        except AssertionError:
            raise RuntimeError(f"{mode} client did not start") from None
        self.samples: list[dict[str, Any]] = []

    def finish(self) -> list[dict[str, Any]]:
        if self.child.proc.poll() is None:
            report = json.loads(self.child.finish(timeout=30)[-1])
            self.samples = report["samples"]
            if report["in_flight_since"] is not None:  # unanswered when stopped
                since = report["in_flight_since"]
                self.samples.append(
                    {"t": since, "s": report["now"] - since, "outcome": "unanswered"}
                )
        return self.samples


def window(samples: list[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    """The calls that started in [start, end)."""
    return [s for s in samples if start <= s["t"] < end]


def stats_of(samples: list[dict[str, Any]], ok: Any = None) -> Stats:
    """p50 of the calls the server answered (a refused connection while it restarts says
    nothing of its speed); worst of all of them (a slow failure counts); failures."""
    answered = [s["s"] for s in samples if isinstance(s["outcome"], int)]
    worst = max((s["s"] for s in samples), default=None)
    ok = ok or (lambda s: s["outcome"] == 200)
    return Stats(len(samples), pct(answered, 50), worst, sum(not ok(s) for s in samples))


# -- raw HTTP ----------------------------------------------------------------------------------


@dataclass
class Answer:
    """An HTTP exchange: a status, or "timeout" / "closed" / "refused" / "error:..."."""

    status: int | str
    seconds: float
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def hang(self) -> bool:
        return self.status in ("timeout", "unanswered") or self.seconds > PATIENCE


def request_bytes(
    method: str, path: str, body: bytes | None, headers: dict[str, str], port: int
) -> bytes:
    """An HTTP/1.1 request, closing the connection after it; Host unless headers name one."""
    lines = [f"{method} {path} HTTP/1.1"]
    if not any(k.lower() == "host" for k in headers):
        lines.append(f"Host: 127.0.0.1:{port}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def _parse(raw: bytes) -> tuple[int | str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    if match is None:
        return ("closed" if not raw else "error:garbled"), {}, b""
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    return int(match.group(1)), headers, body


def _unchunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out.append(rest[:size])
        data = rest[size + 2 :]
    return b"".join(out)


async def exchange(
    port: int, raw: bytes, timeout: float = PATIENCE, local: str | None = None
) -> Answer:
    """Send a raw request on a new connection and read until the server closes it."""
    t0 = time.monotonic()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(local, 0) if local else None
            )
            writer.write(raw)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            data = await reader.read()
    except TimeoutError:
        return Answer("timeout", time.monotonic() - t0)
    except ConnectionRefusedError:
        return Answer("refused", time.monotonic() - t0)
    except ConnectionError:
        return Answer("closed", time.monotonic() - t0)
    except OSError as error:
        return Answer(f"error:{type(error).__name__}", time.monotonic() - t0)
    finally:
        if writer is not None:
            writer.close()
    status, headers, body = _parse(data)
    return Answer(status, time.monotonic() - t0, body, headers)


def http_request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 2 * PATIENCE,
) -> Answer:
    """One request from a synchronous caller (JSON bodies encoded; bytes sent as they are)."""
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    raw = request_bytes(method, path, body, headers or {}, port)
    return asyncio.run(exchange(port, raw, timeout))


def replay(session_id: str, env: dict[str, str]) -> list[dict[str, Any]]:
    """`veil replay SID --json`: the session's events (the rebuilt state is left out)."""
    done = run_veil("replay", session_id, "--json", env=env, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"veil replay {session_id}: {done.stderr.strip()[-300:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return [line["event"] for line in lines if "event" in line]


# -- one scenario's world ----------------------------------------------------------------------


@dataclass
class Row:
    """What one scenario prints."""

    name: str
    cases: int = 0
    statuses: Counter[str] = field(default_factory=Counter)  # 2xx 4xx 5xx 503-outage other
    hangs: int = 0
    recover: float | None = None
    idle_p50: float | None = None
    health: Stats | None = None
    bystander: Stats | None = None
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def count(self, answer: Answer | int | str, outage: bool = False) -> None:
        """Tally one abusive request's outcome."""
        status = answer.status if isinstance(answer, Answer) else answer
        if isinstance(answer, Answer) and answer.hang or status in ("timeout", "unanswered"):
            self.hangs += 1
        elif isinstance(status, int):
            if status == 503 and outage:
                self.statuses["503 outage"] += 1
            else:
                self.statuses[f"{status // 100}xx"] += 1
        else:
            self.statuses["no answer"] += 1


class Stage:
    """A fresh `veil serve` with a health prober and, if asked, a bystander."""

    def __init__(
        self,
        reaper: Reaper,
        upstream_url: str,
        *,
        config: str | None = None,
        bystander: bool = True,
        bystander_model: str = "veil",
    ) -> None:
        self.reaper = reaper
        self.tmp = Path(tempfile.mkdtemp(prefix="veil-abuse-"))
        self.data = self.tmp / "data"
        self.env = {
            "VEIL_DATA_DIR": str(self.data),
            "OPENAI_BASE_URL": upstream_url,
            "OPENAI_API_KEY": "x",
        }
        if config is not None:
            path = self.tmp / "veil.toml"
            path.write_text(config)
            self.env["VEIL_CONFIG"] = str(path)
        self.want_bystander = bystander
        self.bystander_model = bystander_model
        self.veil: VeilProcess | None = None
        self.veils: list[VeilProcess] = []
        self.logged: Counter[str] = Counter()  # error log events of veil serve, and tracebacks
        self.port = 0
        self.prober: Client | None = None
        self.bystander: Client | None = None
        self.t_begin = self.t_end = self.t_idle = 0.0
        self.outages: list[tuple[float, float]] = []  # expected downtime, excluded from checks

    def start_veil(self, port: int = 0) -> float:
        """Start `veil serve` (on this port, or a free one); seconds until it listened."""
        t0 = time.monotonic()
        veil = VeilProcess("serve", "--port", str(port), env=self.env)
        self.reaper.veils.append(veil)
        try:
            self.port = int(veil.wait_for(LISTENING, timeout=120).group(1))
        except AssertionError as error:
            self.reaper.stop_veil(veil, graceful=False)
            raise RuntimeError(f"veil serve did not start: {str(error)[-800:]}") from None
        self.veil = veil
        self.veils.append(veil)
        self.reaper.note_children(veil)
        return time.monotonic() - t0

    def nats_pid(self) -> int:
        pids = processes_mentioning(str(self.data / "nats"))
        if len(pids) != 1:
            raise RuntimeError(f"expected one nats-server for {self.data}, found {pids}")
        return pids[0]

    def __enter__(self) -> Self:
        try:
            self.start_veil()
            self.prober = Client(self.reaper, "health", self.port, 0.05)
            if self.want_bystander:
                self.bystander = Client(
                    self.reaper, "chat", self.port, 0.25, model=self.bystander_model
                )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def idle(self, seconds: float) -> None:
        """The baseline: nothing but the prober and the bystander for this long."""
        self.t_idle = time.monotonic()
        time.sleep(seconds)

    def begin(self) -> None:
        self.t_begin = time.monotonic()

    def end(self) -> None:
        self.t_end = time.monotonic()

    def in_outage(self, sample: dict[str, Any]) -> bool:
        """Whether a call overlapped an expected outage (a restart, the bus down)."""
        return any(sample["t"] < b and sample["t"] + sample["s"] > a for a, b in self.outages)

    def _worst(self, who: str, samples: list[dict[str, Any]]) -> str | None:
        """Where the worst call of a window went: connecting, or the answer; and when."""
        if not samples:
            return None
        worst = max(samples, key=lambda s: s["s"])
        connect = worst.get("connect")
        part = f", {connect * 1e3:.0f} ms of it connecting" if connect is not None else ""
        return (
            f"{who + ' worst ' if who else ''}{worst['s'] * 1e3:.0f} ms{part}, "
            f"{worst['t'] - self.t_begin:.1f} s into the abuse ({worst['outcome']})"
        )

    def _when(self, samples: list[dict[str, Any]]) -> str:
        """The first few calls, as outcome, when (from the abuse's start), and how long."""
        shown = ", ".join(
            f"{s['outcome']} at {s['t'] - self.t_begin:.1f} s ({s['s'] * 1e3:.0f} ms)"
            for s in samples[:4]
        )
        return shown + (", ..." if len(samples) > 4 else "")

    def measure(self, row: Row) -> None:
        """The health and bystander figures of the abuse window, the idle baseline, and
        what veil serve logged as errors."""
        end = self.t_end or time.monotonic()
        if self.logged:
            row.notes.append(
                "veil serve logged: " + ", ".join(f"{k} x{v}" for k, v in self.logged.most_common())
            )
        if self.prober is not None:
            samples = self.prober.finish()
            idle = window(samples, self.t_idle, self.t_begin)
            row.idle_p50 = pct([s["s"] for s in idle], 50)
            during = window(samples, self.t_begin, end)
            row.health = stats_of(during)
            if (where := self._worst("health check", during)) is not None:
                row.notes.append(where)
            # Even while the bus is down the check must answer (503) at once: no exemption.
            if during and (worst := max(during, key=lambda s: s["s"]))["s"] >= STALL:
                row.problems.append(f"health check stalled: {self._worst('', [worst])}")
            failed = [s for s in during if s["outcome"] != 200 and not self.in_outage(s)]
            if failed:
                row.problems.append(
                    f"{len(failed)} health checks failed outside an outage: {self._when(failed)}"
                )
        if self.bystander is not None:
            samples = window(self.bystander.finish(), self.t_begin, end)
            row.bystander = stats_of(samples, ok=lambda s: s.get("ok", False))
            if (where := self._worst("bystander", samples)) is not None:
                row.notes.append(where)
            served = [s for s in samples if not self.in_outage(s)]
            if served and (worst := max(served, key=lambda s: s["s"]))["s"] >= STALL:
                row.problems.append(f"bystander stalled: {self._worst('', [worst])}")
            failed = [s for s in served if not s.get("ok")]
            if failed:
                row.problems.append(
                    f"{len(failed)} bystander chats failed outside an outage: {self._when(failed)}"
                )

    def __exit__(self, *exc: object) -> None:
        for client in (self.prober, self.bystander):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.finish()
        if self.veil is not None:
            self.reaper.stop_veil(self.veil)
        for veil in self.veils:
            with contextlib.suppress(Exception):
                veil.interrupt(timeout=1)  # ended already: this collects the rest of its output
            for line in veil.lines:
                if match := _ERROR_LINE.search(line):
                    self.logged[match.group(1)] += 1
                elif line.startswith(("Traceback", "╭─")):
                    self.logged["(tracebacks)"] += 1
        shutil.rmtree(self.tmp, ignore_errors=True)
