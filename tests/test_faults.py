"""Proof under faults (issue 16): Veil on a 3-node NATS cluster with 2 gateways and 2
workers keeps every acknowledged turn exactly once, answers every failure in OpenAI's
shape, completes every retried request, and its log replays to the live state, while a
worker is SIGKILLed mid-stream (twice), a NATS node restarts, a gateway restarts and a
worker is cut off the bus. The long run: `python bench/faults.py`."""

from __future__ import annotations

import asyncio
from pathlib import Path

from testkit.faults import Rig, plan, run_faults


# Each fault waits for a condition (a client reading a stream from the worker to kill,
# turns completed since the last recovery, the cluster caught up), never a sleep; an
# attempt gives up after 10 s (far above any recovery here) and is retried under its key.
def test_turns_survive_worker_kills_node_and_gateway_restarts_and_a_cut(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        rig.start()
        outcome = asyncio.run(
            run_faults(rig, plan(2, 1, 1, 1), conversations=4, attempt_timeout=10, give_up=30)
        )
    finally:
        rig.stop()
    print(outcome.report())
    assert all(f.recovery is not None for f in outcome.faults)
    assert outcome.findings.ok, outcome.report()
