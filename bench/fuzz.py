"""The longer schemathesis run: every operation of /openapi.json against a real `veil serve`.

`veil serve --port 0` runs as a child process (its own data directory, embedded
nats-server, every actor) with a config file: an admin API key with rate limits, and a
fake OpenAI upstream running in this process. The cases and checks are those of
tests/test_api_fuzz.py (testkit/api_fuzz.py), with more cases per operation: no 5xx, no
hang, answers as documented, schema-breaking requests refused, auth enforced, and
nothing appended to CHAT_EVENTS by a refused request (read through the server's own
`nats.url`).

    python bench/fuzz.py [--examples N] [--seed N]

Prints the cases tried per operation, their statuses and the failures; exits 1 if any.
The default (200 cases per operation) takes a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testkit.api_fuzz import fuzz
from testkit.procs import VeilProcess
from testkit.upstreams import FakeOpenAI

KEY = "sk-bench-fuzz"
LISTENING = r"Veil listening on http://127\.0\.0\.1:(\d+)/v1"

CONFIG = """
[server]
turn_timeout = 15
accept_timeout = 15
max_body_bytes = 262144

[[keys]]
key = "{key}"
tenant = "fuzz"
admin = true
rpm = 1000000
tpm = 1000000000

[engines.up]
kind = "openai"
base_url = "{upstream}"
api_key = "x"

[pipelines.default]
engine = "up"
model = "m"
retries = 0

[[models]]
name = "veil"
pipeline = "default"
"""


class LogProbe:
    """CHAT_EVENTS' last sequence, read over NATS on a loop of its own."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.nc = self.loop.run_until_complete(nats.connect(url))
        self.js = self.nc.jetstream()

    def position(self) -> int:
        info = self.loop.run_until_complete(self.js.stream_info("CHAT_EVENTS"))
        return int(info.state.last_seq)

    def close(self) -> None:
        self.loop.run_until_complete(self.nc.close())
        self.loop.close()


def _known(base: str) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {KEY}"}
    turn = requests.post(
        f"{base}/v1/chat/completions",
        json={"model": "veil", "messages": [{"role": "user", "content": "hello"}]},
        headers=auth,
        timeout=60,
    ).json()
    key = requests.post(f"{base}/v1/admin/keys", json={"tenant": "fuzz"}, headers=auth, timeout=30)
    requests.post(
        f"{base}/v1/knowledge/handbook/documents",
        files={"file": ("faq.md", b"# FAQ\n\nVeil keeps each session's log.\n")},
        headers=auth,
        timeout=120,
    ).raise_for_status()
    return {
        "model": "veil",
        "session_id": turn["session_id"],
        "turn_id": turn["id"].removeprefix("chatcmpl-"),
        "key_id": key.json()["id"],
        "collection": "handbook",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="generated cases per operation")
    parser.add_argument("--seed", type=int, default=20261206)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="veil-fuzz-"))
    upstream = FakeOpenAI().start_in_thread()
    config = tmp / "veil.toml"
    config.write_text(CONFIG.format(key=KEY, upstream=upstream.base_url))
    env = {"VEIL_DATA_DIR": str(tmp / "data"), "VEIL_CONFIG": str(config)}
    veil = VeilProcess("serve", "--port", "0", env=env)
    probe: LogProbe | None = None
    try:
        port = int(veil.wait_for(LISTENING, timeout=180).group(1))
        base = f"http://127.0.0.1:{port}"
        probe = LogProbe((tmp / "data" / "nats.url").read_text().strip())
        document = requests.get(f"{base}/openapi.json", timeout=30).json()
        started = time.monotonic()
        report = fuzz(
            base,
            document,
            KEY,
            examples=args.examples,
            seed=args.seed,
            log_position=probe.position,
            known=_known(base),
            weights={"POST /v1/chat/completions": 3},  # the endpoint that matters most
            timeout=30,
        )
        took = time.monotonic() - started
    finally:
        if probe is not None:
            probe.close()
        veil.stop()
        upstream.stop_thread()
    print(f"schemathesis, seed {args.seed}, {args.examples} generated cases per operation")
    print(report.table())
    print(f"{report.cases} cases in {took:.0f} s")
    for failure in report.failures:
        print("FAILURE", failure)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
