"""How fast a dead worker's partitions move (bus/placement.py), and what serves meanwhile.

Starts a nats-server and two `veil worker --roles sessions` processes, then, over and
over, SIGKILLs one and starts it again. A probe asks every partition's subject many
times a second (an empty command, which a session front refuses with a 400: any answer
says somebody serves the partition) and prints, per kill:

- move: from the SIGKILL until every partition answers again (the dead worker's share
  moves after the membership's lapse; meanwhile the gateway sends those sessions'
  commands to the queue group of all workers, which the probe also asks);
- unplaced: whether the all-workers subject answered during that gap (it must);
- rejoin: from starting the worker again until it beats as a member and every partition
  still answers (a newcomer takes its share before the others let it go: no gap).

The baseline printed beside it is the membership's own setting (heartbeat and lapse):
a move should take about lapse + one heartbeat. Run from the repository root:

    python bench/placement_move.py [--kills 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._stats import percentile
from bus.placement import HEARTBEAT, LAPSE, Beat
from bus.subjects import PARTITIONS, PLACEMENT_SESSIONS, session_partition_wildcard
from testkit.procs import VeilProcess, nats_server

PROBE_TIMEOUT = 0.5


def _env(nats_url: str, data_dir: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("VEIL_", "OPENAI_", "ANTHROPIC_"))
    }
    env.update(
        VEIL_NATS_URL=nats_url,
        VEIL_DATA_DIR=str(data_dir),
        OPENAI_BASE_URL="http://127.0.0.1:9/v1",
        OPENAI_API_KEY="x",
    )
    return env


async def _served(nc: Client, subject: str) -> bool:
    try:
        await nc.request(subject, b"", timeout=PROBE_TIMEOUT)
    except (NoRespondersError, NatsTimeout):
        return False
    return True


def _probe_subject(partition: int) -> str:
    return session_partition_wildcard(partition).replace("*", "probe")


async def _unserved(nc: Client) -> list[int]:
    answers = await asyncio.gather(*(_served(nc, _probe_subject(p)) for p in range(PARTITIONS)))
    return [p for p, ok in enumerate(answers) if not ok]


async def _until_all_served(nc: Client, gap_checks: list[bool], limit: float = 60) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        if not await _unserved(nc):
            return time.perf_counter() - start
        gap_checks.append(await _served(nc, "chat.session.probe.probe.cmd"))
        await asyncio.sleep(0.02)
    raise SystemExit("partitions were not all served again within a minute")


def _worker(env: dict[str, str]) -> VeilProcess:
    return VeilProcess("worker", "--roles", "sessions", env=env)


async def main(kills: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, nats_server(Path(tmp) / "nats") as server:
        env = _env(server.url, Path(tmp) / "data")
        nc = await nats.connect(server.url)
        members: dict[str, float] = {}

        async def heard(msg: nats.aio.msg.Msg) -> None:
            beat = msgspec.json.decode(msg.data, type=Beat)
            if not beat.joining and not beat.leaving:
                members[beat.member] = time.perf_counter()

        await nc.subscribe(PLACEMENT_SESSIONS, cb=heard)
        workers = [_worker(env), _worker(env)]
        try:
            while len(members) < 2:
                await asyncio.sleep(0.05)
            await _until_all_served(nc, [])
            print(f"membership: heartbeat {HEARTBEAT:.1f} s, lapse {LAPSE:.1f} s")
            moves, rejoins, gaps = [], [], []
            for i in range(kills):
                victim = workers[i % 2]
                await asyncio.sleep(HEARTBEAT * 1.5)  # both members heard
                victim.kill()
                checks: list[bool] = []
                moves.append(await _until_all_served(nc, checks))
                gaps.append(all(checks) if checks else True)
                known = set(members)
                started = time.perf_counter()
                workers[i % 2] = _worker(env)
                while not set(members) - known:
                    await asyncio.sleep(0.01)
                gaps_after: list[bool] = []
                await _until_all_served(nc, gaps_after)
                rejoins.append(time.perf_counter() - started)
                print(
                    f"kill {i + 1}: move {moves[-1]:.2f} s, unplaced answered during the gap:"
                    f" {gaps[-1]}, rejoin {rejoins[-1]:.2f} s"
                )
            print(
                f"move p50 {percentile(moves, 50):.2f} s, max {max(moves):.2f} s"
                f" (lapse + heartbeat = {LAPSE + HEARTBEAT:.1f} s);"
                f" unplaced subject answered in every gap: {all(gaps)};"
                f" rejoin p50 {percentile(rejoins, 50):.2f} s"
            )
        finally:
            for worker in workers:
                worker.stop()
            await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5)
    asyncio.run(main(parser.parse_args().kills))
