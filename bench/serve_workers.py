"""Turns per second of `veil serve --workers N` for N in 1, 2 ..., beside the direct call.

Starts a zero-delay fake OpenAI upstream once, then, for each N, `veil serve --workers N`
(its own nats-server and data directory), and drives it from this process with aiohttp:
C concurrent clients, each call a new session with its own text (so memory's embeddings
never come from a cache), non-streaming. The direct cell calls the upstream itself, in
the same run: only ratios travel between machines (FINDINGS.md). `--workers 1` is one
process; N > 1 is a gateway, N turn workers and one memory process.

On 2 cores, more workers mostly share the same two cores: the figure that matters is
taken on a machine with cores to spare (the 16-core one). Run from the repository root:

    python bench/serve_workers.py [--workers 1 2 4] [--clients 32] [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._stats import percentile
from testkit.procs import Child

READY = re.compile(r"Veil listening on http://127\.0\.0\.1:(\d+)/v1")


def _env(upstream: str, data_dir: Path) -> dict[str, str]:
    """Our fake as the only upstream, no external NATS (Veil spawns one), no API keys."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("VEIL_", "OPENAI_", "ANTHROPIC_"))
    }
    env.update(OPENAI_BASE_URL=upstream, OPENAI_API_KEY="x", VEIL_DATA_DIR=str(data_dir))
    return env


async def _drive(url: str, model: str, clients: int, seconds: float) -> dict[str, float]:
    """`clients` loops of chat calls for `seconds` (after a short warm-up): turns/s and
    latency percentiles in ms; fails on the first wrong answer."""
    latencies: list[float] = []
    errors = 0

    async def one(http: aiohttp.ClientSession) -> float:
        text = f"hello {uuid.uuid4().hex[:12]}"
        body = {"model": model, "messages": [{"role": "user", "content": text}]}
        t0 = time.perf_counter()
        async with http.post(url, data=msgspec.json.encode(body)) as resp:
            data = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        content = msgspec.json.decode(data)["choices"][0]["message"]["content"]
        if not content.endswith(text):
            raise RuntimeError(f"unexpected reply {content[:80]!r}")
        return time.perf_counter() - t0

    async def loop(http: aiohttp.ClientSession, until: float, keep: bool) -> None:
        nonlocal errors
        while time.perf_counter() < until:
            try:
                took = await one(http)
            except (aiohttp.ClientError, RuntimeError):
                errors += 1
                continue
            if keep:
                latencies.append(took * 1e3)

    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
        warm = time.perf_counter() + min(3.0, seconds / 5)
        await asyncio.gather(*(loop(http, warm, False) for _ in range(clients)))
        started = time.perf_counter()
        until = started + seconds
        await asyncio.gather(*(loop(http, until, True) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "turns_s": len(latencies) / elapsed,
        "p50": percentile(latencies, 50) if latencies else 0.0,
        "p99": percentile(latencies, 99) if latencies else 0.0,
        "errors": errors,
    }


def _row(name: str, r: dict[str, float]) -> str:
    return (
        f"{name:<22} {r['turns_s']:>9.0f} {r['p50']:>9.2f} {r['p99']:>9.2f} {int(r['errors']):>7}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each cell")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} cores; {args.clients} clients; {args.seconds:.0f} s a cell")
    print(f"{'':<22} {'turns/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}")
    with tempfile.TemporaryDirectory(prefix="veil-bench-") as tmp:
        upstream = Child(
            [sys.executable, "-m", "testkit.upstreams", "openai", "--port", "0"],
            name="upstream",
            cwd=ROOT,
        )
        with upstream:
            base = upstream.wait_for(r"listening on (http://\S+)").group(1) + "/v1"
            direct = asyncio.run(
                _drive(f"{base}/chat/completions", "gpt-4o-mini", args.clients, args.seconds)
            )
            print(_row("direct", direct), flush=True)
            for n in args.workers:
                data = Path(tmp) / f"data-{n}"
                veil = Child(
                    [sys.executable, "-m", "veil.cli", "serve", "--port", "0", "--workers", str(n)],
                    name=f"veil --workers {n}",
                    env=_env(base, data),
                    cwd=ROOT,
                    stderr=Path(tmp) / f"veil-{n}.stderr",
                )
                with veil:
                    port = veil.wait_for(READY, timeout=300).group(1)
                    url = f"http://127.0.0.1:{port}/v1/chat/completions"
                    result = asyncio.run(_drive(url, "veil", args.clients, args.seconds))
                print(_row(f"veil --workers {n}", result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
