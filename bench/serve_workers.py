"""Turns per second of `veil serve --workers N` for N in 1, 2 ..., beside the direct call.

Starts a zero-delay fake OpenAI upstream once, then, for each N and with memory on and
off, `veil serve --workers N` (its own nats-server and data directory), and drives it
from this process with aiohttp: C concurrent clients, each call a new session with its
own text (so memory's embeddings never come from a cache), JSON and then streaming.
The direct cells call the upstream itself, in the same run: only ratios travel between
machines. `--workers 1` is one process; N > 1 is a gateway, N turn workers and one
memory process. Beside each cell: the CPU a turn cost in each kind of process (from
/proc: gateway, turn workers together, the memory process, nats-server), in ms.

On 2 cores, more workers mostly share the same two cores: the figure that matters is
taken on a machine with cores to spare. Run from the repository root:

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
from collections.abc import Iterator
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


# --- CPU per process, from /proc --------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def _tree(root: int) -> Iterator[int]:
    """root and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    todo = [root]
    while todo:
        pid = todo.pop()
        yield pid
        todo.extend(children.get(pid, []))


def _kind(pid: int, root: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "gone"
    if pid == root:
        return "gateway"
    if "nats-server" in cmdline:
        return "nats"
    if "--roles memory" in cmdline:
        return "memory"
    return "workers"


def cpu_by_kind(root: int) -> dict[str, float]:
    """CPU seconds used so far by each kind of process of the tree under root."""
    out: dict[str, float] = {}
    for pid in _tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
        kind = _kind(pid, root)
        out[kind] = out.get(kind, 0.0) + used
    return out


KINDS = ("gateway", "workers", "memory", "nats")


async def _one(http: aiohttp.ClientSession, url: str, model: str, stream: bool) -> float:
    """One turn in a new session: its latency; raises on anything but the echoed text."""
    text = f"hello {uuid.uuid4().hex[:12]}"
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream}
    t0 = time.perf_counter()
    async with http.post(url, data=msgspec.json.encode(body)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
        if stream:
            parts = []
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    choices = msgspec.json.decode(line[6:]).get("choices") or [{}]
                    parts.append(choices[0].get("delta", {}).get("content") or "")
            content = "".join(parts)
        else:
            content = msgspec.json.decode(await resp.read())["choices"][0]["message"]["content"]
    if not content.endswith(text):
        raise RuntimeError(f"unexpected reply {content[:80]!r}")
    return time.perf_counter() - t0


async def _drive(
    url: str, model: str, clients: int, seconds: float, stream: bool, root: int | None
) -> dict[str, float]:
    """`clients` loops of chat calls for `seconds` (after a short warm-up): turns/s,
    latency percentiles in ms, errors, and (with `root`) CPU ms per turn by process kind."""
    latencies: list[float] = []
    errors = 0

    async def loop(http: aiohttp.ClientSession, until: float, keep: bool) -> None:
        nonlocal errors
        while time.perf_counter() < until:
            try:
                took = await _one(http, url, model, stream)
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
        before = cpu_by_kind(root) if root is not None else {}
        started = time.perf_counter()
        until = started + seconds
        await asyncio.gather(*(loop(http, until, True) for _ in range(clients)))
        elapsed = time.perf_counter() - started
        after = cpu_by_kind(root) if root is not None else {}
    turns = max(1, len(latencies))
    result = {
        "turns_s": len(latencies) / elapsed,
        "p50": percentile(latencies, 50) if latencies else 0.0,
        "p99": percentile(latencies, 99) if latencies else 0.0,
        "errors": errors,
    }
    for kind in KINDS:
        result[kind] = (after.get(kind, 0.0) - before.get(kind, 0.0)) * 1e3 / turns
    return result


def _row(name: str, r: dict[str, float], cpu: bool = True) -> str:
    row = f"{name:<30} {r['turns_s']:>8.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} {int(r['errors']):>6}"
    if cpu:
        row += "".join(f" {r[k]:>8.2f}" for k in KINDS)
    return row


def _serve(n: int, memory: bool, base: str, tmp: Path) -> Child:
    data = tmp / f"data-{n}-{memory}"
    argv = [sys.executable, "-m", "veil.cli"]
    if not memory:
        config = tmp / "no-memory.toml"
        config.write_text("[memory]\nenabled = false\n")
        argv += ["--config", str(config)]
    return Child(
        [*argv, "serve", "--port", "0", "--workers", str(n)],
        name=f"veil --workers {n}",
        env=_env(base, data),
        cwd=ROOT,
        stderr=tmp / f"veil-{n}-{memory}.stderr",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each cell")
    parser.add_argument(
        "--memory", choices=["on", "off", "both"], default="both", help="long-term memory"
    )
    args = parser.parse_args(argv)
    memories = {"on": [True], "off": [False], "both": [True, False]}[args.memory]
    print(f"{os.cpu_count()} cores; {args.clients} clients; {args.seconds:.0f} s a cell")
    print(
        f"{'':<30} {'turns/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
        + "".join(f" {k[:8]:>8}" for k in KINDS)
        + "  (CPU ms per turn)"
    )
    with tempfile.TemporaryDirectory(prefix="veil-bench-") as tmp:
        upstream = Child(
            [sys.executable, "-m", "testkit.upstreams", "openai", "--port", "0"],
            name="upstream",
            cwd=ROOT,
        )
        with upstream:
            base = upstream.wait_for(r"listening on (http://\S+)").group(1) + "/v1"
            for stream in (False, True):
                direct = asyncio.run(
                    _drive(
                        f"{base}/chat/completions",
                        "gpt-4o-mini",
                        args.clients,
                        args.seconds,
                        stream,
                        None,
                    )
                )
                mode = "stream" if stream else "json"
                print(_row(f"direct, {mode}", direct, cpu=False), flush=True)
            for n in args.workers:
                for memory in memories:
                    with _serve(n, memory, base, Path(tmp)) as veil:
                        port = veil.wait_for(READY, timeout=300).group(1)
                        url = f"http://127.0.0.1:{port}/v1/chat/completions"
                        for stream in (False, True):
                            result = asyncio.run(
                                _drive(url, "veil", args.clients, args.seconds, stream, veil.pid)
                            )
                            name = (
                                f"--workers {n}, memory {'on' if memory else 'off'},"
                                f" {'stream' if stream else 'json'}"
                            )
                            print(_row(name, result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
