"""Proof under faults, the long run (issue 16): Veil on a 3-node NATS JetStream cluster
with 2 gateways and 2 workers on this machine, steady chat traffic through the official
`openai` SDK, and faults one after another: workers SIGKILLed mid-stream (and replaced),
NATS nodes killed and restarted, gateways restarted, workers cut off the bus for a few
seconds. Then the log is checked against what the clients saw (testkit/logcheck.py).

Run: python bench/faults.py [--worker-kills 100] [--nats-restarts 10] ...

Prints the turns driven, the faults by kind, the client errors by kind, the time to the
first successful turn after each fault, and every check's problems; exits 1 if a check
failed. tests/test_faults.py runs a few cycles of the same.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testkit.faults import Rig, plan, run_faults


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker-kills", type=int, default=100)
    parser.add_argument("--nats-restarts", type=int, default=10)
    parser.add_argument("--gateway-restarts", type=int, default=10)
    parser.add_argument("--cuts", type=int, default=10, help="workers cut off NATS")
    parser.add_argument("--cut-seconds", type=float, default=3.0)
    parser.add_argument("--conversations", type=int, default=6, help="clients at once")
    parser.add_argument("--attempt-timeout", type=float, default=20.0)
    parser.add_argument("--give-up", type=float, default=90.0, help="seconds per request")
    parser.add_argument(
        "--cli-replays", type=int, default=5, help="sessions also checked with `veil replay`"
    )
    args = parser.parse_args()
    faults = plan(args.worker_kills, args.nats_restarts, args.gateway_restarts, args.cuts)
    with tempfile.TemporaryDirectory(prefix="veil-faults-") as where:
        rig = Rig(Path(where))
        try:
            rig.start()
            outcome = asyncio.run(
                run_faults(
                    rig,
                    faults,
                    conversations=args.conversations,
                    cut_seconds=args.cut_seconds,
                    attempt_timeout=args.attempt_timeout,
                    give_up=args.give_up,
                    cli_replays=args.cli_replays,
                )
            )
        finally:
            rig.stop()
    print(outcome.report())
    return 0 if outcome.findings.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
