"""1,000 concurrent streaming clients through `veil serve`, beside the same clients on the upstream.

Starts a fake OpenAI upstream (testkit.upstreams) that sleeps `--token-delay` before each
of a reply's `--tokens` deltas, so that every stream lasts a few seconds, and `veil serve`
on its embedded default (its own nats-server, every actor in one process; `--workers N`
for the multi-process server) with a config that lets it hold the load: `[server]
max_turns_in_flight` above the client count (the default, 1,024 per worker, holds 1,000;
below it the rest get 503 `server_is_overloaded`: `--max-turns-in-flight 256` shows it),
`max_connections_per_client` above it too (every client is 127.0.0.1).

Then, in one run, twice the same load from this process (one aiohttp session, no
connection limit): first straight to the upstream, then through Veil. Each of the
`--clients` clients sends one streamed chat call (a new session with a message of its
own), starting evenly spread over `--ramp` seconds (so the gateway is measured holding
streams, not accepting a storm of connections), and reads the SSE to `data: [DONE]`.
Printed: time to the first content delta (TTFT) and to the end, p50/p99, failures by
kind, the peaks of calls in flight and of streams open at once (answered 200 and not yet
ended), which show whether all of them were really held together; the CPU this process
(the clients) and the server (the upstream alone, or Veil's whole tree: gateway,
nats-server, workers) used, in % of one core; the Veil tree's peak descriptors and RSS.

The open-file limit is raised to the hard limit first; the children inherit it (Veil
raises its own again). Run from the repository root (about a minute on 2 cores):

    python bench/load_streams.py [--clients 1000] [--ramp 2] [--tokens 20] [--token-delay 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._load_kit import (
    Call,
    Tally,
    call,
    chat_body,
    cpu_seconds,
    fd_limit_of,
    pct,
    process_tree,
    raise_nofile,
    sample,
    start_upstream,
    start_veil,
    stop,
    veil_env,
    words,
)

T = TypeVar("T")
UPSTREAM_MODEL = "gpt-4o-mini"  # what Veil asks its upstream for by default


def write_config(path: Path, args: argparse.Namespace) -> None:
    path.write_text(
        "[server]\n"
        f"max_turns_in_flight = {args.max_turns_in_flight}\n"
        f"max_queued_per_session = {args.max_queued_per_session}\n"
        f"max_connections_per_client = {max(1000, 2 * args.clients)}\n"
        f"max_connections = {max(10_000, 4 * args.clients)}\n"
    )


class Watch:
    """Peaks of a process tree's open descriptors and RSS, sampled every 0.25 s, and the
    CPU it used meanwhile."""

    def __init__(self, root: int | None) -> None:
        self.root = root
        self.fds = 0
        self.rss_kib = 0
        self.cpu_s = 0.0

    def _cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in process_tree(self.root)) if self.root else 0.0

    async def run(self) -> None:
        if self.root is None:
            return
        start = self._cpu()
        try:
            while True:
                fds = rss = 0
                for pid in process_tree(self.root):
                    if (got := sample(pid)) is not None:
                        fds += got["fds"]
                        rss += got.get("rss_kib", 0)
                self.fds, self.rss_kib = max(self.fds, fds), max(self.rss_kib, rss)
                await asyncio.sleep(0.25)
        finally:
            self.cpu_s = self._cpu() - start


async def wave(
    url: str, model: str, args: argparse.Namespace, watch: Watch
) -> tuple[Tally, int, int, float, float]:
    """`--clients` streams started evenly over `--ramp` seconds; (their tally, the peaks of
    calls in flight and of streams open (answered 200, not ended) at once, the seconds
    from the first start to the last end, this process's CPU seconds)."""
    tally = Tally()
    opened = [0, 0]  # open now, peak
    flying = [0, 0]
    cpu0 = _own_cpu()
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        t0 = time.perf_counter()

        async def client(i: int) -> None:
            await asyncio.sleep(t0 + i * args.ramp / args.clients - time.perf_counter())
            tag = uuid.uuid4().hex[:12]
            body = chat_body(model, words(args.tokens, tag), stream=True)
            flying[0] += 1
            flying[1] = max(flying[1], flying[0])
            try:
                tally.add(await call(http, url, body, True, f"echo: {tag}", opened))
            finally:
                flying[0] -= 1

        watcher = asyncio.create_task(watch.run())
        try:
            await asyncio.gather(*(client(i) for i in range(args.clients)))
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)  # its CPU figure
        wall = time.perf_counter() - t0
        return tally, flying[1], opened[1], wall, _own_cpu() - cpu0


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def warm(url: str, model: str, n: int) -> list[Call]:
    """A few streams through Veil first: models, embedder and connections come up."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        calls = []
        for i in range(n):
            tag = f"warm{i}"
            body = chat_body(model, words(4, tag), stream=True)
            calls.append(await call(http, url, body, True, f"echo: {tag}"))
        return calls


def row(
    name: str, tally: Tally, flying: int, peak: int, wall: float, cpu: float, server_cpu: float
) -> str:
    return (
        f"{name:<8} {tally.ok:>6} {flying:>7} {peak:>6} {pct(tally.ttfts, 50):>9} "
        f"{pct(tally.ttfts, 99):>9} {pct(tally.totals, 50):>9} {pct(tally.totals, 99):>9} "
        f"{wall:>7.1f} {100 * cpu / wall:>7.0f} {100 * server_cpu / wall:>7.0f}  "
        f"{tally.errors_text()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds over which clients start")
    parser.add_argument("--tokens", type=int, default=20, help="content deltas per reply")
    parser.add_argument("--token-delay", type=float, default=0.5, help="upstream s per delta")
    parser.add_argument("--workers", default="1", help="veil serve --workers (1: one process)")
    parser.add_argument("--max-turns-in-flight", type=int, default=4096)
    parser.add_argument("--max-queued-per-session", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=120.0, help="s per call at most")
    args = parser.parse_args(argv)
    if args.tokens < 3:
        parser.error("--tokens must be at least 3")
    soft, hard = raise_nofile(max(65536, 8 * args.clients))
    with tempfile.TemporaryDirectory(prefix="veil-load-") as tmp:
        logs = Path(tmp)
        config = logs / "veil.toml"
        write_config(config, args)
        print(
            f"{os.cpu_count()} cores; {args.clients} streaming clients started over a "
            f"{args.ramp:g} s ramp; {args.tokens} deltas x {args.token_delay * 1e3:.0f} ms each "
            f"(a stream lasts ~{args.tokens * args.token_delay:.1f} s upstream); "
            f"RLIMIT_NOFILE {soft}/{hard}",
            flush=True,
        )
        print(
            f"veil serve --workers {args.workers}; [server] max_turns_in_flight = "
            f"{args.max_turns_in_flight}, max_queued_per_session = {args.max_queued_per_session}",
            flush=True,
        )
        upstream, base = start_upstream(args.token_delay, logs)
        with upstream:
            up_watch = Watch(upstream.pid)
            direct = run(wave(f"{base}/chat/completions", UPSTREAM_MODEL, args, up_watch))
            upstream_cpu = [up_watch.cpu_s]
            env = veil_env(base, logs / "data", config)
            veil, port = start_veil(["--workers", str(args.workers)], env, logs)
            try:
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                limit = fd_limit_of(veil.pid)
                warmed = run(warm(url, "veil", 5))
                if not all(c.ok for c in warmed):
                    print(f"!! warm-up failed: {[c.error for c in warmed]}", flush=True)
                watch = Watch(veil.pid)
                through = run(wave(url, "veil", args, watch))
            finally:
                code = stop(veil)
        print(
            f"{'':<8} {'ok':>6} {'peak in':>7} {'peak':>6} {'ttft p50':>9} {'ttft p99':>9} "
            f"{'total p50':>9} {'total p99':>9} {'wall s':>7} {'client':>7} {'server':>7}  errors"
        )
        print(
            f"{'':<8} {'':>6} {'flight':>7} {'open':>6} {'ms':>9} {'ms':>9} {'ms':>9} {'ms':>9} "
            f"{'':>7} {'CPU %':>7} {'CPU %':>7}"
        )
        print(row("direct", *direct, upstream_cpu[0]))
        print(row("veil", *through, watch.cpu_s))
        print(
            f"veil tree (gateway, nats-server, workers): peak {watch.fds} open descriptors, "
            f"peak RSS {watch.rss_kib / 1024:.0f} MiB; veil's RLIMIT_NOFILE at start {limit} "
            f"(Veil raises it to the hard limit); exit code {code}"
        )
    return 0


def run(main: Coroutine[Any, Any, T]) -> T:
    """The clients on uvloop where installed (as Veil runs): the client's own overhead
    then weighs less on the figures; the same kind of loop for both waves."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


if __name__ == "__main__":
    sys.exit(main())
