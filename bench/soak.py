"""A soak: `veil serve --workers 2` under steady mixed traffic, watched for leaks.

Starts a fake OpenAI upstream (testkit.upstreams, `--token-delay` before each streamed
delta), a nats-server with nats.conf plus a profiling port, and `veil serve --workers N
--metrics-port 0` on that server (VEIL_NATS_URL): the gateway in the parent, N turn
workers and one memory/usage worker as children, each serving its Prometheus metrics on
a port of its own (the bench finds which process listens where in /proc). Traffic is
paced: `--clients` loops share `--rate` requests a second, each call half JSON, half
streamed (`--stream-share`), each loop continuing its session for `--turns` turns and
then opening a new one, every message its own text.

Every `--every` seconds, for each process (from /proc): RSS (VmRSS), open descriptors,
threads, and asyncio tasks (`veil_asyncio_tasks` on its metrics page). Printed: each
figure idle before the load (65 s after a warm-up), after the warm-up of the run (its
first 20%), at the end of the load, and idle 5 s and 65 s after it (past the ~60 s an
idle upstream connection may stay pooled); growth from warm-up to end (the pass
criterion: under 5%) and whether descriptors and tasks come back to their idle count
(no leak). nats-server is judged by the growth of its live Go heap (after forced
collections, at those points only) as a share of its RSS, printed beside its RSS: a Go
process keeps the memory it freed for a while, so its RSS is a high-water mark. `[server] actor_idle` is set to
`--actor-idle` (3 s) so that the session actors of the load are passivated by then:
with the default 300 s, a live actor is a cache, not a leak. Also: requests done,
failures by kind, and throughput and latency beside the same paced traffic sent
straight to the upstream first (`--direct-seconds`).

Run from the repository root (10 minutes by default; --quick: 1):

    python bench/soak.py [--minutes 10 | --quick] [--rate 20] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._load_kit import (
    Tally,
    call,
    chat_body,
    fd_limit_of,
    listening_ports,
    metrics_ports,
    pct,
    process_tree,
    raise_nofile,
    sample,
    scrape_gauge,
    start_upstream,
    start_veil,
    stop,
    veil_env,
    words,
)
from testkit.cluster import free_ports
from veil.natsserver import NatsServer as VeilNats
from veil.natsserver import default_config

T = TypeVar("T")
UPSTREAM_MODEL = "gpt-4o-mini"
TASKS = "veil_asyncio_tasks"
RSS_GROWTH_LIMIT = 5.0  # % from the end of the warm-up to the end of the load
# Seconds after the load for the last look (and from the warm-up to the idle baseline):
# the model engines keep an idle upstream connection 30 s (actors/engines/openai_http.py),
# and aiohttp's pool sweeps every 30 s, so one released just after a sweep lives ~60 s.
LAST_LOOK = 65
POINTS = ("idle before", "warm (20%)", "end", "idle +5 s", f"idle +{LAST_LOOK} s")


def write_config(path: Path, args: argparse.Namespace) -> None:
    path.write_text(f"[server]\nactor_idle = {args.actor_idle}\n")


# -- traffic ---------------------------------------------------------------------------------------


@dataclass
class Traffic:
    """What the paced loops did: JSON and streamed calls, new and continued sessions."""

    json: Tally = field(default_factory=Tally)
    stream: Tally = field(default_factory=Tally)
    new: int = 0
    continued: int = 0
    late: int = 0  # calls that started after their slot: the server did not keep up
    wall: float = 0.0

    @property
    def done(self) -> int:
        return self.json.ok + self.stream.ok

    @property
    def failed(self) -> int:
        return sum(self.json.errors.values()) + sum(self.stream.errors.values())


async def paced(
    url: str, model: str, args: argparse.Namespace, seconds: float, sessions: bool
) -> Traffic:
    """`--clients` loops sharing `--rate` calls a second for `seconds`; with `sessions`,
    each loop continues the session its last answer named (else each call stands alone,
    as the upstream has no sessions)."""
    traffic = Traffic()
    period = args.clients / args.rate
    rng = random.Random(1)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout
    ) as http:
        t0 = time.perf_counter()
        until = t0 + seconds

        async def loop(i: int) -> None:
            session: str | None = None
            turns = 0
            slot = t0 + i * period / args.clients
            while slot < until:
                wait = slot - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                elif wait < -period:
                    traffic.late += 1
                stream = rng.random() < args.stream_share
                if session is None or turns >= args.turns:
                    session, turns = None, 0
                    traffic.new += 1
                else:
                    traffic.continued += 1
                tag = uuid.uuid4().hex[:12]
                body = chat_body(
                    model, words(args.tokens, tag), stream, session if sessions else None
                )
                done = await call(http, url, body, stream, f"echo: {tag}")
                (traffic.stream if stream else traffic.json).add(done)
                if done.ok:
                    session, turns = done.session_id, turns + 1
                else:
                    session = None
                slot += period

        await asyncio.gather(*(loop(i) for i in range(args.clients)))
        traffic.wall = time.perf_counter() - t0
    return traffic


def traffic_row(name: str, t: Traffic) -> str:
    return (
        f"{name:<16} {t.done + t.failed:>8} {t.done / t.wall:>7.1f} "
        f"{pct(t.json.totals, 50):>6}/{pct(t.json.totals, 99):<6} "
        f"{pct(t.stream.ttfts, 50):>6}/{pct(t.stream.ttfts, 99):<6} "
        f"{pct(t.stream.totals, 50):>6}/{pct(t.stream.totals, 99):<6} {t.late:>6}  "
        f"json: {t.json.errors_text()}; stream: {t.stream.errors_text()}"
    )


# -- nats-server, with its Go heap in view -----------------------------------------------------


class NatsServer:
    """nats.conf's server with a profiling port, which `veil serve` uses (VEIL_NATS_URL)
    instead of spawning its own: RSS is a Go process's high-water mark, kept after what
    it held is freed; whether the server keeps more is its live heap after a collection."""

    def __init__(self, logs: Path) -> None:
        [self.prof_port] = free_ports(1)
        config = logs / "nats-profiled.conf"
        base = default_config()
        config.write_text(
            (base.read_text() if base is not None else "") + f"\nprof_port: {self.prof_port}\n"
        )
        self.server = VeilNats(logs / "nats", config=config)
        self.url = self.server.start()
        assert self.server._proc is not None  # started
        self.pid = self.server._proc.pid

    def stop(self) -> None:
        self.server.stop()


async def go_heap_kib(http: aiohttp.ClientSession, port: int) -> float | None:
    """HeapAlloc after two forced collections (`gc=1`): what the server still holds (the
    first collection moves pooled buffers aside, the second frees them)."""
    url = f"http://127.0.0.1:{port}/debug/pprof/heap?debug=1&gc=1"
    found = None
    for _ in range(2):
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return None
        found = re.search(r"^# HeapAlloc = (\d+)$", text, re.MULTILINE)
    return None if found is None else int(found.group(1)) / 1024


# -- the process tree ----------------------------------------------------------------------------


Figures = dict[str, float | None]  # rss_kib, fds, threads, tasks


class Tree:
    """Veil's processes: the gateway (the root), nats-server, the workers; their figures."""

    def __init__(self, root: int, ports: dict[str, int], nats: NatsServer) -> None:
        self.root = root
        self.nats = nats
        self.names: dict[int, str] = {}
        self.ports: dict[int, int] = {}  # pid -> its metrics port
        self.alive: set[int] = set()
        self._wanted = {port: name for name, port in ports.items()}
        self.refresh()

    def refresh(self) -> None:
        """The processes now (one started after the first look, a worker restarted for
        one, is named with a '*')."""
        tree = process_tree(self.root) | {self.nats.pid: "nats-server"}
        for pid, label in tree.items():
            if pid not in self.names:
                name = "gateway (serve)" if pid == self.root else label
                for port in listening_ports(pid) & set(self._wanted):
                    self.ports[pid] = port
                    if pid != self.root:
                        name = f"{self._wanted[port]} ({label.split()[-1]})"
                self.names[pid] = name + ("*" if self.alive else "")
        self.alive = set(tree)

    async def figures(self, http: aiohttp.ClientSession, heap: bool = False) -> dict[int, Figures]:
        """Each process's figures; with `heap`, nats-server's live Go heap too (after a
        collection it forces: only at the points of the tables, not every sample)."""
        self.refresh()
        out: dict[int, Figures] = {}
        for pid in sorted(self.alive):
            got = sample(pid)
            if got is None:
                continue
            figures: Figures = {k: float(v) for k, v in got.items()}
            port = self.ports.get(pid)
            figures["tasks"] = None if port is None else await scrape_gauge(http, port, TASKS)
            if heap and pid == self.nats.pid:
                figures["heap_kib"] = await go_heap_kib(http, self.nats.prof_port)
            out[pid] = figures
        return out


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    return f"{value / 1024:.1f}" if kind in ("rss_kib", "heap_kib") else f"{value:.0f}"


def report(tree: Tree, points: dict[str, dict[int, Figures]]) -> list[str]:
    """The tables, one per figure, and the verdict lines; returns the failures."""
    failures: list[str] = []
    pids = sorted({pid for at in points.values() for pid in at}, key=lambda p: (p != tree.root, p))
    for kind, title in (
        ("rss_kib", "RSS MiB"),
        ("heap_kib", "live Go heap MiB (after GC)"),
        ("fds", "open fds"),
        ("tasks", "asyncio tasks"),
        ("threads", "threads"),
    ):
        growing = kind in ("rss_kib", "heap_kib")
        extra = "   growth warm->end" if growing else "   idle after - idle before"
        print(f"\n{title:<30}" + "".join(f"{p:>12}" for p in POINTS) + extra)
        for pid in pids:
            row = [points[p].get(pid, {}).get(kind) for p in POINTS]
            if kind == "heap_kib" and all(v is None for v in row):
                continue
            line = f"{tree.names.get(pid, '?')[:22]:<22} {pid:>7}" + "".join(
                f"{_fmt(v, kind):>12}" for v in row
            )
            warm, end, before, after = row[1], row[2], row[0], row[3]
            if growing and warm and end is not None:
                # A Go process is judged by what it holds, not by its high-water mark: its
                # live heap's growth, as a share of its RSS (the scale of every other row).
                judged = "heap_kib" if pid == tree.nats.pid else "rss_kib"
                rss_warm = points[POINTS[1]].get(pid, {}).get("rss_kib") or warm
                growth = 100 * (end - warm) / (rss_warm if kind == "heap_kib" else warm)
                line += f"   {growth:+.1f}%" + (" of its RSS" if kind == "heap_kib" else "")
                if kind == judged and growth >= RSS_GROWTH_LIMIT:
                    failures.append(f"{tree.names[pid]} {title} grew {growth:+.1f}% after warm-up")
                elif kind != judged:
                    line += " (not judged: the heap is)"
            elif kind in ("fds", "tasks", "threads") and before is not None and after is not None:
                later = row[4] if row[4] is not None else after
                line += f"   {after - before:+.0f} (+{LAST_LOOK} s: {later - before:+.0f})"
                if kind != "threads" and min(after, later) > before:
                    failures.append(
                        f"{tree.names[pid]} {title}: {before:.0f} idle before, "
                        f"{after:.0f} 5 s after, {later:.0f} {LAST_LOOK} s after"
                    )
            print(line)
    return failures


# -- the run -------------------------------------------------------------------------------------


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def soak(
    url: str, tree: Tree, args: argparse.Namespace, seconds: float
) -> tuple[Traffic, dict[str, dict[int, Figures]], list[tuple[float, float, float]]]:
    """Warm-up, idle baseline, the load with samples, then idle after it."""
    points: dict[str, dict[int, Figures]] = {}
    series: list[tuple[float, float, float]] = []  # (s, tree RSS MiB, tree fds)
    # One scraping connection to each page for the whole run (opened before the idle
    # baseline), so that the scrapes themselves change no process's descriptor count.
    keep = aiohttp.TCPConnector(limit=0, keepalive_timeout=3600)
    async with aiohttp.ClientSession(connector=keep) as http:
        await tree.figures(http)
        warm = Traffic()
        async with aiohttp.ClientSession() as client:
            for i in range(20):  # every path once: json, stream, new, continued
                body = chat_body("veil", words(args.tokens, f"warm{i}"), i % 2 == 1)
                done = await call(client, url, body, i % 2 == 1, f"echo: warm{i}")
                (warm.stream if i % 2 else warm.json).add(done)
        if warm.failed:
            print(f"!! warm-up failures: {warm.json.errors_text()}; {warm.stream.errors_text()}")
        # Past the actors' idle time and the upstream pool's sweep (see LAST_LOOK).
        await asyncio.sleep(max(args.actor_idle + 3, LAST_LOOK))
        points["idle before"] = await tree.figures(http, heap=True)
        load = asyncio.create_task(paced(url, "veil", args, seconds, True))
        t0 = time.perf_counter()
        warm_at = t0 + 0.2 * seconds
        while not load.done():
            await asyncio.wait({load}, timeout=args.every)
            now = time.perf_counter()
            warm_point = "warm (20%)" not in points and now >= warm_at
            figures = await tree.figures(http, heap=warm_point or load.done())
            series.append(
                (
                    now - t0,
                    sum(f.get("rss_kib") or 0 for f in figures.values()) / 1024,
                    sum(f.get("fds") or 0 for f in figures.values()),
                )
            )
            if warm_point:
                points["warm (20%)"] = figures
            points["end"] = figures  # the last one: taken as the load finished
        traffic = load.result()
        points.setdefault("warm (20%)", points.get("end", {}))
        await asyncio.sleep(5)
        points["idle +5 s"] = await tree.figures(http, heap=True)
        await asyncio.sleep(LAST_LOOK - 5)
        points[f"idle +{LAST_LOOK} s"] = await tree.figures(http, heap=True)
    return traffic, points, series


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load")
    parser.add_argument("--quick", action="store_true", help="1 minute, to try it")
    parser.add_argument("--rate", type=float, default=20.0, help="calls a second, all loops")
    parser.add_argument("--clients", type=int, default=32, help="client loops")
    parser.add_argument("--workers", type=int, default=2, help="veil serve --workers")
    parser.add_argument("--stream-share", type=float, default=0.5)
    parser.add_argument("--turns", type=int, default=5, help="turns of a session, then a new one")
    parser.add_argument("--tokens", type=int, default=10, help="tokens of a reply")
    parser.add_argument("--token-delay", type=float, default=0.02, help="upstream s per delta")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--actor-idle", type=float, default=3.0, help="[server] actor_idle")
    parser.add_argument("--direct-seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.direct_seconds = 1.0, 10.0
    seconds = args.minutes * 60
    soft, hard = raise_nofile()
    print(
        f"{os.cpu_count()} cores; soak of {args.minutes:g} min at {args.rate:g} calls/s "
        f"({args.clients} client loops; {args.stream_share:.0%} streamed; a session continued "
        f"for {args.turns} turns, then a new one; replies of {args.tokens} tokens, "
        f"{args.token_delay * 1e3:.0f} ms per streamed delta upstream); veil serve --workers "
        f"{args.workers}; [server] actor_idle = {args.actor_idle:g}; samples every "
        f"{args.every:g} s; RLIMIT_NOFILE {soft}/{hard}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="veil-soak-") as tmp:
        logs = Path(tmp)
        config = logs / "veil.toml"
        write_config(config, args)
        upstream, base = start_upstream(args.token_delay, logs)
        with upstream:
            direct = run(
                paced(f"{base}/chat/completions", UPSTREAM_MODEL, args, args.direct_seconds, False)
            )
            nats = NatsServer(logs)
            env = veil_env(base, logs / "data", config) | {"VEIL_NATS_URL": nats.url}
            veil, port = start_veil(
                ["--workers", str(args.workers), "--metrics-port", "0"], env, logs
            )
            try:
                ports = metrics_ports(veil)
                tree = Tree(veil.pid, ports, nats)
                print(
                    f"metrics ports: {ports}; processes: "
                    + ", ".join(f"{tree.names[p]} {p}" for p in sorted(tree.names))
                    + f"; gateway RLIMIT_NOFILE {fd_limit_of(veil.pid)}",
                    flush=True,
                )
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                traffic, points, series = run(soak(url, tree, args, seconds))
            finally:
                code = stop(veil)
                nats.stop()
    print(
        f"\n{'traffic':<16} {'calls':>8} {'ok/s':>7} {'json p50/p99':>13} "
        f"{'ttft p50/p99':>13} {'stream p50/p99':>13} {'late':>6}  errors (ms)"
    )
    print(traffic_row(f"direct {args.direct_seconds:g} s", direct))
    print(traffic_row(f"veil {args.minutes:g} min", traffic))
    print(
        f"veil: {traffic.done} calls answered, {traffic.failed} failed; "
        f"{traffic.new} new sessions, {traffic.continued} continued; exit code {code}"
    )
    step = max(1, len(series) // 10)
    print(
        "tree RSS MiB / fds over the run: "
        + ", ".join(f"{t:.0f}s {rss:.0f}/{fds:.0f}" for t, rss, fds in series[::step])
    )
    failures = report(tree, points)
    print()
    if traffic.failed:
        failures.append(f"{traffic.failed} calls failed")
    for failure in failures:
        print(f"FAIL: {failure}")
    if not failures:
        print(
            f"PASS: RSS growth under {RSS_GROWTH_LIMIT:g}% after warm-up in every process "
            "(nats-server: its live heap), "
            "descriptors and tasks back to their idle count, no call failed"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
