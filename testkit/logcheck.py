"""What the log must say after a fault run, checked against what the clients saw.

1. Every answer a client acknowledged is in its session's log exactly once: one
   `reply.completed` for its turn, with the same words.
2. No reply is recorded twice: no turn with two endings, no command (Idempotency-Key)
   started again, except after its run was closed as unfinished (its worker lost, its
   lease lapsed: nothing answered it, so a retry runs it again).
3. Every request completed under its own key, and every failed attempt got an
   OpenAI-shaped error (JSON `{"error": ...}` or an SSE error event), or found no gateway
   listening, or had its connection closed before the answer began (a keep-alive race
   with a draining gateway: testkit/traffic.py).
4. The state a fold of the log gives (`veil replay --digest`) is the live actor's
   (`state_digest` of GET /v1/sessions/{id}, read with an audit key).
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx2 as httpx
from nats.aio.client import Client

from actors.session import UNFINISHED
from eventstore.events import ReplyCompleted, TurnCancelled, TurnFailed, TurnStarted
from eventstore.jetstream import JetStreamEventStore
from eventstore.store import StoredEvent
from testkit.procs import run_veil
from testkit.traffic import UNSHAPED, Request
from veil.replay import replay_digest

__all__ = ["Findings", "check_cli_replays", "check_log", "read_log"]

ENDINGS = (ReplyCompleted, TurnFailed, TurnCancelled)


@dataclass
class Findings:
    sessions: int = 0
    turns_in_log: int = 0
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    endings: Counter[str] = field(default_factory=Counter)
    # Turns started and never ended, with the worker that held them (a hang's trace).
    open_turns: list[str] = field(default_factory=list)

    def add(self, check: str, problem: str) -> None:
        self.problems[check].append(problem)

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())

    def report(self, limit: int = 10) -> str:
        lines = [f"{self.sessions} sessions, {self.turns_in_log} turns in the log"]
        if self.open_turns:
            lines.append(f"turns never ended: {len(self.open_turns)}")
            lines += [f"  {t}" for t in self.open_turns[:limit]]
        for check, found in sorted(self.problems.items()):
            lines.append(f"{check}: {len(found)} problem(s)")
            lines += [f"  {p}" for p in found[:limit]]
        return "\n".join(lines)


async def read_log(nc: Client, tenant: str) -> dict[str, list[StoredEvent]]:
    """Every session of the tenant, with its events."""
    store = JetStreamEventStore(nc.jetstream(), nc)
    return {
        info.session_id: await store.load(tenant, info.session_id)
        for info in await store.sessions()
        if info.tenant == tenant
    }


async def check_log(
    log: dict[str, list[StoredEvent]],
    requests: Sequence[Request],
    gateway: str,
    audit_key: str,
) -> Findings:
    found = Findings(sessions=len(log))
    replies: dict[str, list[tuple[str, ReplyCompleted]]] = defaultdict(list)
    for sid, stored in log.items():
        # A command's run: open, or ended; a run closed as unfinished (its worker lost,
        # its lease lapsed) may run again under the same command, nothing else may.
        runs: dict[str, str] = {}
        holders: dict[str, str | None] = {}
        command_of: dict[str, str] = {}
        for item in stored:
            event = item.event
            if isinstance(event, TurnStarted):
                before = runs.get(event.command_id)
                if before is not None and before != "unfinished":
                    found.add(
                        "2 no double reply",
                        f"command {event.command_id} of {sid} started again while {before}",
                    )
                runs[event.command_id] = "open"
                command_of[event.turn_id] = event.command_id
                holders[event.turn_id] = event.holder
                found.turns_in_log += 1
            elif isinstance(event, ENDINGS):
                found.endings[type(event).__name__] += 1
                command = command_of.get(event.turn_id)
                unfinished = isinstance(event, TurnFailed) and event.code in UNFINISHED
                if command is not None:
                    if runs.get(command) != "open":
                        found.add("2 no double reply", f"turn {event.turn_id} of {sid} ended twice")
                    runs[command] = "unfinished" if unfinished else "ended"
                if isinstance(event, ReplyCompleted):
                    replies[event.turn_id].append((sid, event))
        found.open_turns += [
            f"{sid} turn {t} held by {holders[t]}"
            for t, c in command_of.items()
            if runs.get(c) == "open"
        ]

    for r in requests:
        _check_request(found, r, replies)
    await _check_digests(found, log, gateway, audit_key)
    return found


def _check_request(
    found: Findings, r: Request, replies: dict[str, list[tuple[str, ReplyCompleted]]]
) -> None:
    bad = [a.outcome for a in r.attempts if a.outcome.split(" ")[0] in UNSHAPED]
    bad += [a.outcome for a in r.attempts if "not_openai_shaped" in a.outcome]
    if bad:
        found.add("3 errors are OpenAI-shaped", f"{r.key}: {', '.join(bad)}")
    if r.turn_id is None:
        tried = ", ".join(a.outcome for a in r.attempts[-5:])
        found.add(
            "3 retries complete",
            f"{r.key} ({'stream' if r.stream else 'json'}, session {r.session_id}): "
            f"{len(r.attempts)} attempts never completed; last: {tried}",
        )
        return
    recorded = replies.get(r.turn_id, [])
    if len(recorded) != 1:
        found.add("1 acknowledged is logged once", f"{r.key}: {len(recorded)} replies recorded")
        return
    sid, event = recorded[0]
    if event.content != r.content:
        found.add("1 acknowledged is logged once", f"{r.key}: the log says {event.content!r}")
    if r.answered_session is not None and sid != r.answered_session:
        found.add("1 acknowledged is logged once", f"{r.key}: logged in {sid}")


async def _check_digests(
    found: Findings, log: dict[str, list[StoredEvent]], gateway: str, audit_key: str
) -> None:
    headers = {"Authorization": f"Bearer {audit_key}"}
    async with httpx.AsyncClient(timeout=30, headers=headers) as http:
        for sid, stored in log.items():
            answer = await http.get(f"{gateway}/sessions/{sid}")
            if answer.status_code != 200:
                found.add("4 replay = live", f"{sid}: GET answered {answer.status_code}")
                continue
            live = answer.json().get("state_digest")
            if live != replay_digest(stored):
                found.add("4 replay = live", f"{sid}: live {live} != replayed")


async def check_cli_replays(
    found: Findings,
    sessions: Sequence[str],
    tenant: str,
    gateway: str,
    audit_key: str,
    env: dict[str, str],
) -> None:
    """`veil replay --digest` itself (a process, as an auditor runs it) against the live
    digest, for a few sessions: the check above runs the same fold in this process."""
    headers = {"Authorization": f"Bearer {audit_key}"}
    async with httpx.AsyncClient(timeout=30, headers=headers) as http:
        for sid in sessions:
            live = (await http.get(f"{gateway}/sessions/{sid}")).json().get("state_digest")
            done = await asyncio.to_thread(
                run_veil, "replay", sid, "--tenant", tenant, "--digest", env=env
            )
            if done.returncode != 0 or done.stdout.strip() != live:
                found.add(
                    "4 replay = live",
                    f"{sid}: veil replay --digest said {done.stdout.strip() or done.stderr!r}, "
                    f"live {live}",
                )
