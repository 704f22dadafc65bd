"""What bench/load_streams.py and bench/soak.py share: the open-file limit, the fake
upstream and `veil serve` as child processes, one streamed or JSON chat call timed and
classified, and the figures of a process tree read from /proc.

Linux only (/proc). Everything binds to 127.0.0.1 on ephemeral ports.
"""

from __future__ import annotations

import os
import re
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._stats import percentile
from testkit.procs import Child

__all__ = [
    "READY",
    "Call",
    "Tally",
    "call",
    "chat_body",
    "cpu_seconds",
    "fd_limit_of",
    "listening_ports",
    "pct",
    "process_tree",
    "raise_nofile",
    "sample",
    "scrape_gauge",
    "start_upstream",
    "start_veil",
    "stop",
    "veil_env",
    "words",
]

READY = re.compile(r"Veil listening on http://127\.0\.0\.1:(\d+)/v1")
METRICS_LINE = re.compile(r"^(?:\[([\w-]+)\] )?Metrics on http://127\.0\.0\.1:(\d+)/metrics")
JSON_HEADERS = {"Content-Type": "application/json"}

_decode = msgspec.json.decode
_encode = msgspec.json.encode


# -- limits and child processes ------------------------------------------------------------------


def raise_nofile(want: int = 65536) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE towards `want` (at most the hard limit), so
    that it and every child it starts afterwards (the limit is inherited) can hold the
    connections; the (soft, hard) limits now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(max(soft, want), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def fd_limit_of(pid: int) -> int | None:
    """A running process's soft limit on open files (from /proc/<pid>/limits)."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    except OSError:
        pass
    return None


def veil_env(upstream_base: str, data_dir: Path, config: Path) -> dict[str, str]:
    """Our fake as the only upstream, no external NATS (Veil spawns its own), no API keys,
    the bench's config file."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("VEIL_", "OPENAI_", "ANTHROPIC_"))
    }
    env.update(
        OPENAI_BASE_URL=upstream_base,
        OPENAI_API_KEY="x",
        VEIL_DATA_DIR=str(data_dir),
        VEIL_CONFIG=str(config),
        PYTHONUNBUFFERED="1",
    )
    return env


def start_upstream(token_delay: float, logs: Path) -> tuple[Child, str]:
    """The fake OpenAI upstream (testkit.upstreams) as a process of its own, sleeping
    `token_delay` before each streamed delta; (child, its /v1 base URL)."""
    cmd = [sys.executable, "-m", "testkit.upstreams", "openai", "--port", "0"]
    if token_delay:
        cmd += ["--token-delay", str(token_delay)]
    child = Child(cmd, name="upstream", cwd=ROOT, stderr=logs / "upstream.stderr")
    return child, child.wait_for(r"listening on (http://\S+)").group(1) + "/v1"


def start_veil(args: list[str], env: dict[str, str], logs: Path) -> tuple[Child, int]:
    """`veil serve ARGS` (stdout read here, stderr to a file); (child, its port)."""
    child = Child(
        [sys.executable, "-m", "veil.cli", "serve", "--port", "0", *args],
        name="veil serve",
        env=env,
        cwd=ROOT,
        stderr=logs / "veil.stderr",
    )
    try:
        port = int(child.wait_for(READY, timeout=300).group(1))
    except AssertionError:
        stop(child, 10)
        tail = "\n".join(child.stderr_lines()[-30:])
        raise RuntimeError(f"veil serve did not start:\n{tail}") from None
    return child, port


def stop(child: Child, timeout: float = 40.0) -> int:
    return child.stop(timeout, warn=lambda text: print(f"!! {text}", flush=True))


def metrics_ports(child: Child) -> dict[str, int]:
    """The metrics listeners `veil serve --metrics-port 0` announced: "gateway" for its
    own, the worker's name for each child's ("[worker-1] Metrics on ...")."""
    found: dict[str, int] = {}
    for line in child.lines:
        if m := METRICS_LINE.search(line):
            found[m.group(1) or "gateway"] = int(m.group(2))
    return found


# -- one chat call --------------------------------------------------------------------------------


def words(n: int, tag: str) -> str:
    """A user message the fake echoes as exactly n tokens ("echo:" + n - 1 words), its
    first word `tag` (unique per call: memory never embeds the same text twice)."""
    return " ".join([tag, *(f"w{i}" for i in range(2, n))])


def chat_body(model: str, text: str, stream: bool, session_id: str | None = None) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    if session_id is not None:
        body["session_id"] = session_id
    return _encode(body)


@dataclass
class Call:
    """One call's outcome: times in seconds from its start, or the kind of its failure."""

    ok: bool
    ttft: float | None = None  # streams: to the first content delta
    total: float = 0.0
    error: str | None = None
    session_id: str | None = None


class _Failed(Exception):
    pass


def _error_kind(status: int, body: bytes) -> str:
    """`HTTP 503 server_is_overloaded`: the status and the error's code or type."""
    try:
        error = _decode(body).get("error") or {}
        code = error.get("code") or error.get("type") or ""
    except (msgspec.DecodeError, AttributeError):
        code = ""
    return f"HTTP {status} {code}".rstrip()


async def call(
    http: aiohttp.ClientSession,
    url: str,
    body: bytes,
    stream: bool,
    expect: str,
    opened: list[int] | None = None,
) -> Call:
    """POST one chat completion, read it to its end, check its text; never raises (but
    for cancellation): a failure comes back as its kind. `opened`, if given, is a
    one-item counter of streams open now, with its peak in a second item."""
    t0 = time.perf_counter()
    counted = False
    try:
        async with http.post(url, data=body, headers=JSON_HEADERS) as resp:
            if resp.status != 200:
                return Call(
                    False,
                    total=time.perf_counter() - t0,
                    error=_error_kind(resp.status, await resp.read()),
                )
            if stream and opened is not None:
                opened[0] += 1
                opened[1] = max(opened[1], opened[0])
                counted = True
            if stream:
                text, ttft, session = await _read_sse(resp, t0)
            else:
                reply = _decode(await resp.read())
                text, ttft = reply["choices"][0]["message"]["content"], None
                session = reply.get("session_id")
            session = session or resp.headers.get("X-Session-Id")
        took = time.perf_counter() - t0
        if not text.startswith(expect):
            return Call(False, ttft, took, f"unexpected reply {text[:40]!r}")
        return Call(True, ttft, took, session_id=session)
    except _Failed as failure:
        return Call(False, total=time.perf_counter() - t0, error=str(failure))
    except (aiohttp.ClientError, TimeoutError, OSError) as error:
        return Call(False, total=time.perf_counter() - t0, error=type(error).__name__)
    except (msgspec.DecodeError, KeyError, IndexError, TypeError) as error:
        return Call(
            False, total=time.perf_counter() - t0, error=f"bad body: {type(error).__name__}"
        )
    finally:
        if counted and opened is not None:
            opened[0] -= 1


async def _read_sse(
    resp: aiohttp.ClientResponse, t0: float
) -> tuple[str, float | None, str | None]:
    """The text, time to the first content delta and session id of an SSE body, read to
    `data: [DONE]` (and its end)."""
    parts: list[str] = []
    ttft: float | None = None
    session: str | None = None
    done = False
    async for line in resp.content:
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].rstrip()
        if payload == b"[DONE]":
            done = True
            continue
        chunk = _decode(payload)
        if "error" in chunk:
            error = chunk["error"] or {}
            raise _Failed(f"error event {error.get('code') or error.get('type') or ''}".rstrip())
        session = session or chunk.get("session_id")
        choices = chunk.get("choices") or []
        piece = choices[0].get("delta", {}).get("content") if choices else None
        if piece:
            if ttft is None:
                ttft = time.perf_counter() - t0
            parts.append(piece)
    if not done:
        raise _Failed("stream ended without [DONE]")
    return "".join(parts), ttft, session


def pct(samples: list[float], p: float, scale: float = 1e3) -> str:
    """The shared percentile (bench/_stats.py) in ms, or '-' without samples."""
    return f"{percentile(samples, p) * scale:.0f}" if samples else "-"


@dataclass
class Tally:
    """Calls of one kind: their times and their failures by kind."""

    ttfts: list[float] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, done: Call) -> None:
        if done.ok:
            self.totals.append(done.total)
            if done.ttft is not None:
                self.ttfts.append(done.ttft)
        else:
            self.errors[done.error or "?"] += 1

    @property
    def ok(self) -> int:
        return len(self.totals)

    def errors_text(self) -> str:
        return ", ".join(f"{n} {kind}" for kind, n in self.errors.most_common()) or "none"


# -- a process tree, from /proc ---------------------------------------------------------------------


def _ppid_and_name(pid: int) -> tuple[int, str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = text.split("(", 1)[1].rsplit(")", 1)[0]
    return int(text.rsplit(")", 1)[1].split()[1]), name


def process_tree(root: int) -> dict[int, str]:
    """root and all its descendants, with a name each: the command (python's role from
    its arguments: "serve", "worker sessions,models", ...)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (found := _ppid_and_name(int(entry.name))) is not None:
            parents.setdefault(found[0], []).append(int(entry.name))
    tree: dict[int, str] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        tree[pid] = _label(pid)
        todo.extend(parents.get(pid, []))
    return tree


def _label(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    args = [a.decode(errors="replace") for a in argv if a]
    if not args:
        return "?"
    if "veil.cli" in args:
        rest = args[args.index("veil.cli") + 1 :]
        role = rest[0] if rest else "veil"
        if "--roles" in rest:
            role += " " + rest[rest.index("--roles") + 1]
        return role
    return Path(args[0]).name if "python" not in Path(args[0]).name else " ".join(args[1:3])


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def sample(pid: int) -> dict[str, int] | None:
    """RSS (KiB, VmRSS), open descriptors and threads of a process; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    figures = {"fds": fds}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key == "VmRSS":
            figures["rss_kib"] = int(rest.split()[0])
        elif key == "Threads":
            figures["threads"] = int(rest.split()[0])
    return figures


def listening_ports(pid: int) -> set[int]:
    """The TCP ports a process listens on (IPv4, loopback included): its sockets' inodes
    matched against /proc/net/tcp's LISTEN entries."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with_target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if with_target.startswith("socket:["):
                inodes.add(with_target[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


async def scrape_gauge(http: aiohttp.ClientSession, port: int, name: str) -> float | None:
    """One unlabelled sample of a metrics page on 127.0.0.1:port, None when absent."""
    try:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    except (TimeoutError, aiohttp.ClientError, OSError):
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None
