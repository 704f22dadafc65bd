"""Rate limits across gateway processes: how close to its limit a key is held, and what
the limits add to a request's latency.

Starts a nats-server, the fake OpenAI upstream, one `veil worker` and `--gateways`
`veil gateway` processes (4 by default), and makes keys with `veil keys create`. Then:

1. Admission: clients send a key with `--rpm L` (300 by default) twice its limit, spread
   round-robin over every gateway, at an even pace for `--seconds` (60), and the run
   prints how many were admitted against what the limit allows (L per 60 s; goal: within
   5%). The run starts on a whole second: the window counts in whole seconds, so a run
   of 60 s started half-way through a second would span 61 of them.
2. Latency: one client, sequential calls to one gateway, alternating a key whose rpm, tpm
   and concurrency limits are set (high enough never to refuse) with a key without
   limits, on the same build: median and p90 side by side, and what the limits add.

Run from the repository root (about 90 s with the defaults):

    python bench/limits.py [--seconds 60] [--rpm 300] [--gateways 4] [--calls 400]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._stats import percentile
from testkit.procs import Child, VeilProcess, nats_server, run_veil

BODY = {"model": "veil", "messages": [{"role": "user", "content": "hello from the bench"}]}


def make_key(env: dict[str, str], *limits: str) -> str:
    made = run_veil("keys", "create", "--tenant", "bench", *limits, env=env)
    if made.returncode != 0:
        raise RuntimeError(f"veil keys create failed: {made.stdout}{made.stderr}")
    return made.stdout.strip().splitlines()[-1]


async def post(http: aiohttp.ClientSession, url: str, key: str) -> tuple[int, float]:
    """One chat call: its status and latency in ms."""
    started = time.perf_counter()
    async with http.post(
        f"{url}/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        await response.read()
        return response.status, (time.perf_counter() - started) * 1e3


async def ready(http: aiohttp.ClientSession, urls: list[str], keys: list[str]) -> None:
    """Until every gateway knows every key (they read the key store as it changes)."""
    deadline = time.monotonic() + 30
    for url in urls:
        for key in keys:
            while True:
                async with http.get(
                    f"{url}/models", headers={"Authorization": f"Bearer {key}"}
                ) as response:
                    if response.status == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} never accepted a key")
                await asyncio.sleep(0.05)


async def admission(urls: list[str], key: str, rpm: int, seconds: float) -> None:
    rate = 2 * rpm / 60  # requests per second: twice the limit
    count = round(rate * seconds)
    print(
        f"\n1. admission: {count} calls over {seconds:g} s ({rate:g}/s, twice rpm={rpm}), "
        f"round-robin over {len(urls)} gateways"
    )
    statuses: Counter[str] = Counter()
    by_gateway: Counter[int] = Counter()
    latencies: dict[str, list[float]] = {"200": [], "429": []}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        await ready(http, urls, [key])
        # Start on a whole second (see the module's docstring).
        await asyncio.sleep(math.ceil(time.time()) - time.time() + 0.01)
        started = time.perf_counter()

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            gateway = i % len(urls)
            try:
                status, ms = await post(http, urls[gateway], key)
            except (aiohttp.ClientError, TimeoutError) as error:
                statuses[type(error).__name__] += 1
                return
            statuses[str(status)] += 1
            latencies.setdefault(str(status), []).append(ms)
            if status == 200:
                by_gateway[gateway] += 1

        await asyncio.gather(*(one(i) for i in range(count)))
        took = time.perf_counter() - started
    admitted = statuses["200"]
    allowed = rpm * max(1, math.ceil(seconds / 60))
    off = 100 * (admitted - allowed) / allowed
    print(f"   sent {count} in {took:.1f} s; answers: {dict(sorted(statuses.items()))}")
    print(
        f"   admitted {admitted} vs the limit's {allowed} for {seconds:g} s: {off:+.1f}% "
        f"({'within' if abs(off) <= 5 else 'NOT within'} 5%)"
    )
    print(
        "   admitted per gateway: "
        + ", ".join(f"#{g + 1} {by_gateway[g]}" for g in range(len(urls)))
    )
    for status, samples in latencies.items():
        if samples:
            print(
                f"   latency of the {status}s: median {percentile(samples, 50):.2f} ms, "
                f"p90 {percentile(samples, 90):.2f} ms"
            )


async def latency(url: str, limited: str, unlimited: str, calls: int) -> None:
    print(
        f"\n2. latency: 1 client, {calls} sequential calls per key to one gateway, "
        "alternating the keys"
    )
    samples: dict[str, list[float]] = {"no limits": [], "limits on": []}
    async with aiohttp.ClientSession() as http:
        await ready(http, [url], [limited, unlimited])
        for key in (limited, unlimited) * 20:  # warm-up: connections, caches
            await post(http, url, key)
        for _ in range(calls):
            for name, key in (("limits on", limited), ("no limits", unlimited)):
                status, ms = await post(http, url, key)
                if status != 200:
                    raise RuntimeError(f"{name}: HTTP {status}")
                samples[name].append(ms)
    print(f"   {'':<10} {'median':>9} {'p90':>9}")
    for name, values in samples.items():
        print(f"   {name:<10} {percentile(values, 50):>6.2f} ms {percentile(values, 90):>6.2f} ms")
    added = [
        percentile(samples["limits on"], p) - percentile(samples["no limits"], p) for p in (50, 90)
    ]
    print(f"   {'added':<10} {added[0]:>+6.2f} ms {added[1]:>+6.2f} ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="length of the admission run")
    p.add_argument("--rpm", type=int, default=300, help="the key's limit, L")
    p.add_argument("--gateways", type=int, default=4)
    p.add_argument("--calls", type=int, default=400, help="latency calls per key")
    args = p.parse_args(argv)
    print(f"machine: {os.cpu_count()} CPUs; {args.gateways} gateways, 1 worker, 1 nats-server")
    children: list[Child] = []
    with (
        tempfile.TemporaryDirectory(prefix="veil-bench-limits-") as tmp,
        nats_server(Path(tmp) / "nats") as nats,
    ):
        try:
            upstream = Child(
                [sys.executable, "-m", "testkit.upstreams", "openai", "--port", "0"],
                name="upstream",
                cwd=ROOT,
            )
            children.append(upstream)
            base = upstream.wait_for(r"listening on (http://\S+)").group(1) + "/v1"
            config = Path(tmp) / "veil.toml"
            config.write_text("[memory]\nenabled = false\n")
            env = {
                "VEIL_NATS_URL": nats.url,
                "VEIL_CONFIG": str(config),
                "VEIL_DATA_DIR": str(Path(tmp) / "data"),
                "OPENAI_BASE_URL": base,
                "OPENAI_API_KEY": "x",
            }
            limited = make_key(env, "--rpm", str(args.rpm))
            high = make_key(env, "--rpm", "1000000000", "--tpm", "1000000000000",
                            "--concurrency", "1000")  # fmt: skip
            unlimited = make_key(env)
            worker = VeilProcess("worker", env=env)
            children.append(worker)
            worker.wait_for("Workers ready")
            urls = []
            for _ in range(args.gateways):
                gateway = VeilProcess("gateway", "--port", "0", env=env)
                children.append(gateway)
                port = gateway.wait_for(r"Veil listening on http://127\.0\.0\.1:(\d+)/v1").group(1)
                urls.append(f"http://127.0.0.1:{port}/v1")
            asyncio.run(admission(urls, limited, args.rpm, args.seconds))
            asyncio.run(latency(urls[0], high, unlimited, args.calls))
        finally:
            for child in reversed(children):
                child.stop(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
