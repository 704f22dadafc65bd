"""One client of bench/abuse.py in its own process: health checks, or chats, each one timed.

Its own process so that what the bench does meanwhile (20,000 sockets, thousands of bodies,
the fake upstream's thread) never holds a GIL under a measurement: the latencies are the
server's. Every call opens a fresh connection, as a load balancer's check or a new user does.
It runs until its stdin closes, ends the call in flight, then prints one JSON object: each call's start on the
system-wide monotonic clock (comparable with the bench's own), its seconds and its outcome
(an HTTP status, or "timeout", "refused", "closed", "error:..."), and a call still in flight.

    python bench/_abuse_probe.py health PORT --interval 0.05
    python bench/_abuse_probe.py chat PORT --interval 0.25 --tag bystander
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time
from typing import Any

# A call that takes longer than this is a hang (the suite's definition).
PATIENCE = 30.0


def call(
    port: int, method: str, path: str, body: bytes | None
) -> tuple[int | str, bytes, float | None]:
    """One request on a new connection: (status or what went wrong, body, seconds the TCP
    connect took: a full listen queue drops the SYN, and the client retries after 1 s)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PATIENCE)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    connected = None
    t0 = time.monotonic()
    try:
        conn.connect()
        connected = time.monotonic() - t0
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read(), connected
    except TimeoutError:
        return "timeout", b"", connected
    except ConnectionRefusedError:
        return "refused", b"", connected
    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
        return "closed", b"", connected
    except (OSError, http.client.HTTPException) as error:
        return f"error:{type(error).__name__}", b"", connected
    finally:
        conn.close()


class Client:
    """Calls at most every `interval` seconds (start to start) until stopped."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.samples: list[dict[str, Any]] = []
        self.in_flight: float | None = None
        self.session: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self.stop.is_set():
            wait = next_at - time.monotonic()
            if wait > 0 and self.stop.wait(wait):
                return
            next_at = max(next_at + self.args.interval, time.monotonic())
            n += 1
            self.once(n)

    def once(self, n: int) -> None:
        sample: dict[str, Any] = {}
        started = self.in_flight = time.monotonic()
        if self.args.mode == "health":
            outcome, _, connect = call(self.args.port, "GET", "/healthz", None)
        else:
            text = f"{self.args.tag} #{n}"
            body: dict[str, Any] = {
                "model": self.args.model,
                "messages": [{"role": "user", "content": text}],
            }
            if self.session is not None:
                body["session_id"] = self.session
            outcome, raw, connect = call(
                self.args.port, "POST", "/v1/chat/completions", json.dumps(body).encode()
            )
            sample.update(text=text, session=self.session, ok=False)
            if outcome == 200:
                try:
                    reply = json.loads(raw)
                    content = reply["choices"][0]["message"]["content"]
                    sample.update(session=reply.get("session_id"), ok=content == f"echo: {text}")
                except (ValueError, KeyError, IndexError, TypeError):
                    pass
                self.session = self.session or sample["session"]
        sample.update(t=started, s=time.monotonic() - started, outcome=outcome, connect=connect)
        self.samples.append(sample)
        self.in_flight = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("mode", choices=["health", "chat"])
    parser.add_argument("port", type=int)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--tag", default="bystander")
    parser.add_argument("--model", default="veil")
    client = Client(parser.parse_args())
    loop = threading.Thread(target=client.run, daemon=True)
    loop.start()
    print("ready", flush=True)
    sys.stdin.read()  # until the bench closes it
    client.stop.set()
    loop.join(PATIENCE + 5)  # the call in flight ends, unless it hangs
    in_flight = client.in_flight
    samples = list(client.samples)
    if samples and samples[-1]["t"] == in_flight:  # it ended just now
        in_flight = None
    report = {"samples": samples, "in_flight_since": in_flight, "now": time.monotonic()}
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    os._exit(0)  # a call still in flight does not hold the exit


if __name__ == "__main__":
    main()
