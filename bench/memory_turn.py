"""What long-term memory adds to a turn: the same conversation through Veil with memory on and off.

Starts a zero-delay fake upstream and `veil serve` twice (memory off, then
on), and drives the same sequential multi-turn conversations (one client,
each session continued for --turns turns) through each, printing turn latency
p50/p99 and the difference. With memory on, each turn embeds its query and
searches the index while the projection embeds the previous turns in the
background; both share this machine's two cores.

    python bench/memory_turn.py [--sessions 20] [--turns 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._stats import percentile
from testkit.procs import Child

JSON = {"Content-Type": "application/json"}
SENTENCES = [
    "I just got back from a hiking trip in the Dolomites.",
    "My sister Ana is visiting next weekend.",
    "Can you suggest a vegetarian dinner for six people?",
    "I'm trying to learn the cello, it's harder than I thought.",
    "The heating in my flat broke again this morning.",
    "Remind me what I said about my sister's visit?",
    "What should I pack for a rainy week in Edinburgh?",
    "My manager wants the budget report by Friday.",
    "I prefer tea without sugar, by the way.",
    "Any tips for sleeping better on long flights?",
]


def start(args: list[str], env: dict[str, str], pattern: str) -> tuple[Child, str]:
    # In the bench's process group, as before: a Ctrl-C reaches them too.
    child = Child(
        args, env={**os.environ, **env}, cwd=ROOT, stderr=subprocess.DEVNULL, new_session=False
    )
    try:
        return child, child.wait_for(pattern, timeout=600).group(1)
    except AssertionError:
        child.kill()
        raise RuntimeError(f"{args} ended before printing {pattern!r}") from None


def stop(child: Child) -> None:
    child.stop(60)


async def drive(base: str, sessions: int, turns: int) -> list[float]:
    latencies: list[float] = []
    async with aiohttp.ClientSession() as http:
        for s in range(sessions):
            sid = None
            for t in range(turns):
                body: dict[str, object] = {
                    "model": "veil",
                    "messages": [
                        {
                            "role": "user",
                            "content": f"{SENTENCES[(s + t) % len(SENTENCES)]} ({s}.{t})",
                        }
                    ],
                }
                if sid:
                    body["session_id"] = sid
                started = time.perf_counter()
                # One write for headers and body (json= may take two, and meet delayed ACKs).
                payload = json.dumps(body).encode()
                async with http.post(f"{base}/chat/completions", data=payload, headers=JSON) as r:
                    reply = await r.json()
                    assert r.status == 200, reply
                latencies.append((time.perf_counter() - started) * 1000)
                sid = reply["session_id"]
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--turns", type=int, default=10)
    args = parser.parse_args()
    upstream, root = start(
        [
            sys.executable,
            "-m",
            "testkit.upstreams",
            "openai",
            "--port",
            "0",
            "--reply",
            "Noted, thanks.",
        ],
        {},
        r"listening on (http://\S+)",
    )
    results: dict[str, list[float]] = {}
    try:
        for label, enabled in (("memory off", "false"), ("memory on", "true")):
            with tempfile.TemporaryDirectory() as data:
                config = Path(data) / "veil.toml"
                config.write_text(f"[memory]\nenabled = {enabled}\n")
                env = {
                    "OPENAI_BASE_URL": f"{root}/v1",
                    "OPENAI_API_KEY": "x",
                    "VEIL_DATA_DIR": data,
                    "VEIL_CONFIG": str(config),
                    "VEIL_NATS_URL": "",
                }
                veil, base = start(
                    [sys.executable, "-m", "veil.cli", "serve", "--port", "0"],
                    env,
                    r"Veil listening on (http://\S+/v1)",
                )
                try:
                    asyncio.run(drive(base, 2, 3))  # warm-up: model load, connections
                    results[label] = asyncio.run(drive(base, args.sessions, args.turns))
                finally:
                    stop(veil)
    finally:
        stop(upstream)
    print(f"{args.sessions} sessions x {args.turns} turns, one client, zero-delay upstream")
    for label, values in results.items():
        print(
            f"  {label:10}  p50 {percentile(values, 50):6.2f} ms  p99 {percentile(values, 99):6.2f} ms  n={len(values)}"
        )
    added50 = percentile(results["memory on"], 50) - percentile(results["memory off"], 50)
    added99 = percentile(results["memory on"], 99) - percentile(results["memory off"], 99)
    print(f"  memory adds p50 {added50:.2f} ms, p99 {added99:.2f} ms (target: p50 under 8 ms)")


if __name__ == "__main__":
    main()
