"""The abuse suite: what hostile or broken clients do to a real `veil serve`, and whether
everyone else is still served meanwhile.

Each scenario starts its own `veil serve --port 0` (temporary data directory, a config
file when it needs one, the developer's OPENAI_* / ANTHROPIC_* / VEIL_* variables left out)
against a fake OpenAI upstream running in this process, and drives it over real HTTP from
here. Meanwhile a prober (GET /healthz every 50 ms) and a bystander (an ordinary chat every
250 ms on its own session) run in processes of their own, so nothing the bench does holds
their clock; their first seconds, before the abuse starts, are the idle baseline of the
same run (machines differ fourfold: compare ratios, not milliseconds).

    malformed  a few thousand seeded malformed bodies: truncated, flipped bytes, wrong
               types, nesting 65 / 1,000 / 100,000 deep, duplicate keys, random bytes
    huge       2,048 messages in a turn, then follow-ups; 2,049 (must be 400); a session
               grown to ~20,000 messages over several turns, then a follow-up
    slow       slowloris (a header byte every 2 s), headers and half a body, silence,
               a body a byte a second: each must be cut at its timeout (header and
               body timeouts 10 s in its config, the body's default 60 s being long
               for a bench; 4 s with --quick)
    flood      20,000 idle connections (held by helper processes, each within its own
               open-file limit), then a valid chat, which must succeed
    calc       the calculator tool asked for hostile expressions by the model
    xsite      cross-site requests while authentication is off: all refused, none runs
    crash      veil serve SIGKILLed mid-stream, restarted on the same data directory:
               the session is free again in seconds and the cut turn reads worker_lost
    natskill   the embedded nats-server SIGKILLed under load: 503s while it is down,
               no hangs, and every acknowledged turn is in its session's log

Each row: cases, 2xx / 4xx / 5xx (503s during an outage apart), hangs (over 30 s or no
answer), time to recover where it applies, the health check's idle p50, p50 and worst
during the abuse, and the bystander's p50, worst and failures. Rows print as scenarios
finish, a summary table at the end; progress goes to stderr.

    python bench/abuse.py [--quick] [--only NAME[,NAME]] [--seed N]

It exits with 1 when a row found a problem (a 5xx, a hang, a stall of a second or more,
a refusal that should have been, a lost turn) or a scenario failed to run.

The full run takes about two minutes on two idle cores (a few on busy ones); --quick about
a minute and a half, most of it the server's own timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import http.client
import json
import os
import random
import re
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _abuse_cases import CALCULATOR_CASES, cross_site_cases, malformed_bodies
from _abuse_kit import (
    PATIENCE,
    Answer,
    Client,
    Reaper,
    Row,
    Stage,
    clean_environment,
    exchange,
    http_request,
    pct,
    raise_open_files,
    replay,
    request_bytes,
)

from testkit.procs import Child
from testkit.upstreams import FakeOpenAI, Fault, ToolCalls

CHAT = "/v1/chat/completions"
FLOOD = 20_000
# Connections per source address in the flood and the slow scenario, under the server's
# per-client cap (1,000): what must hold them off is the global cap and the timeouts.
PER_ADDRESS = 400


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


# -- the fake upstream -------------------------------------------------------------------------


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(p["text"] for p in content if isinstance(p, dict) and "text" in p)
            return content if isinstance(content, str) else ""
    return ""


def upstream_reply(body: dict[str, Any]) -> str | ToolCalls:
    """Echo, as the fake does by default; with the calculator offered, "calc case N" makes
    the model call it with CALCULATOR_CASES[N], and a tool result is answered with itself."""
    messages = body.get("messages") or []
    if messages and messages[-1].get("role") == "tool":
        return f"calculated: {str(messages[-1].get('content'))[:200]}"
    text = _last_user_text(body)
    offered = {(t.get("function") or {}).get("name") for t in body.get("tools") or []}
    if "calculator" in offered and (match := re.fullmatch(r"calc case (\d+)", text)):
        return ToolCalls([("calculator", CALCULATOR_CASES[int(match.group(1))][1])])
    return f"echo: {text}"


def config(
    upstream: str,
    *,
    server: dict[str, float] | None = None,
    calculator: bool = False,
    slow: str | None = None,
) -> str:
    """A config file: model "veil" on the upstream; "calc" with the calculator tool; "slow"
    on a second upstream; [server] settings."""
    lines = ["[server]", *(f"{k} = {v}" for k, v in (server or {}).items()), ""]
    engines = {"up": upstream, **({"slow": slow} if slow else {})}
    for name, url in engines.items():
        lines += [f"[engines.{name}]", 'kind = "openai"', f'base_url = "{url}"', 'api_key = "x"']
    pipelines = {"default": ("up", "[]"), "slow": ("slow", "[]"), "calc": ("up", '["calculator"]')}
    wanted = ["default", *(["calc"] if calculator else []), *(["slow"] if slow else [])]
    for name in wanted:
        engine, tools = pipelines[name]
        lines += [
            f"[pipelines.{name}]",
            f'engine = "{engine}"',
            f'model = "{name}-model"',
            "retries = 0",
            f"tools = {tools}",
        ]
    for name in wanted:
        public = "veil" if name == "default" else name
        lines += ["[[models]]", f'name = "{public}"', f'pipeline = "{name}"']
    return "\n".join(lines) + "\n"


@dataclass
class Ctx:
    reaper: Reaper
    upstream: FakeOpenAI
    quick: bool
    seed: int

    @property
    def idle(self) -> float:
        return 1.0 if self.quick else 2.0

    def stage(self, **options: Any) -> Stage:
        return Stage(self.reaper, self.upstream.base_url, **options)

    def chat_requests(self, marker: str) -> int:
        """Chat requests the upstream received whose body mentions marker."""
        return sum(marker in json.dumps(r.body) for r in list(self.upstream.requests))


# -- 1. malformed and deeply nested JSON -------------------------------------------------------


async def _send_all(port: int, raws: list[bytes], concurrency: int) -> list[Answer]:
    gate = asyncio.Semaphore(concurrency)

    async def one(raw: bytes) -> Answer:
        async with gate:
            return await exchange(port, raw)

    return await asyncio.gather(*(one(raw) for raw in raws))


def malformed(ctx: Ctx, row: Row) -> None:
    cases = malformed_bodies(random.Random(ctx.seed), 400 if ctx.quick else 3_000)
    headers = {"Content-Type": "application/json"}
    with ctx.stage() as stage:
        raws = [request_bytes("POST", CHAT, body, headers, stage.port) for _, body in cases]
        stage.idle(ctx.idle)
        stage.begin()
        answers = asyncio.run(_send_all(stage.port, raws, concurrency=8))
        stage.end()
    stage.measure(row)
    exact: Counter[str] = Counter()
    accepted: Counter[str] = Counter()
    for (kind, body), answer in zip(cases, answers, strict=True):
        row.cases += 1
        row.count(answer)
        exact[str(answer.status)] += 1
        if isinstance(answer.status, int) and answer.status < 300:
            accepted[kind.split(" in ")[0]] += 1
        if not isinstance(answer.status, int) or answer.status >= 500:
            row.problems.append(f"{kind}: {answer.status} {answer.body[:120]!r} for {body[:60]!r}")
    slowest = max(zip(answers, cases, strict=True), key=lambda pair: pair[0].seconds)
    row.notes.append("statuses: " + ", ".join(f"{k} x{v}" for k, v in exact.most_common()))
    if accepted:
        row.notes.append(
            "still valid after mutation (ran a turn): "
            + ", ".join(f"{k} {v}" for k, v in accepted.most_common())
        )
    row.notes.append(f"slowest: {slowest[1][0]} {slowest[0].seconds * 1e3:.0f} ms")
    deep = [a for (kind, _), a in zip(cases, answers, strict=True) if kind.startswith("deep")]
    row.notes.append(
        f"nested 65/1,000/100,000 deep: {len(deep)} cases, statuses "
        + ", ".join(f"{k} x{v}" for k, v in Counter(str(a.status) for a in deep).items())
    )


# -- 2. huge message counts --------------------------------------------------------------------


def _conversation(tag: str, n: int, system: bool = False) -> list[dict[str, str]]:
    """n tiny messages, alternating, ending with the user's; a system prompt first if asked."""
    turns = n - 1 if system else n
    messages = [
        {"role": "user" if (turns - 1 - i) % 2 == 0 else "assistant", "content": f"{tag}{i}"}
        for i in range(turns)
    ]
    return ([{"role": "system", "content": "Be brief."}] if system else []) + messages


def huge(ctx: Ctx, row: Row) -> None:
    grow_to = 4_000 if ctx.quick else 20_000
    with ctx.stage() as stage:
        stage.idle(ctx.idle)
        stage.begin()

        def chat(what: str, messages: list[Any], sid: str | None = None, want: int = 200) -> Answer:
            body: dict[str, Any] = {"model": "veil", "messages": messages}
            if sid is not None:
                body["session_id"] = sid
            answer = http_request(stage.port, "POST", CHAT, body)
            row.cases += 1
            row.count(answer)
            log(f"  {what}: {answer.status} in {answer.seconds:.2f} s")
            if answer.status != want:
                row.problems.append(f"{what}: {answer.status} {answer.body[:160]!r}")
            return answer

        first = chat("2,048 messages", _conversation("a", 2_048, system=True))
        sid = (first.json() or {}).get("session_id")
        follow = [chat(f"follow-up {i}", [user(f"follow-up {i}")], sid) for i in range(3)]
        over = chat("2,049 messages", _conversation("b", 2_049, system=True), want=400)
        code = ((over.json() or {}).get("error") or {}).get("code")
        grown, turns, grow_sid = 0, [], None
        while grown < grow_to:
            answer = chat(
                f"growing turn {len(turns) + 1}", _conversation(f"g{len(turns)}-", 2_047), grow_sid
            )
            if answer.status != 200:
                break
            grow_sid = grow_sid or (answer.json() or {}).get("session_id")
            grown += 2_048  # the messages and the reply
            turns.append(answer.seconds)
        last = chat(f"follow-up on {grown:,} messages", [user("and now?")], grow_sid)
        listing = http_request(stage.port, "GET", f"/v1/sessions/{grow_sid}/messages")
        row.cases += 1
        row.count(listing)
        stage.end()
    stage.measure(row)
    listed = len((listing.json() or {}).get("data") or [])
    follow_ups = ", ".join(f"{a.status}/{a.seconds:.2f} s" for a in follow)
    row.notes.append(
        f"2,048 messages in one turn: {first.status} in {first.seconds:.2f} s; "
        f"follow-ups {follow_ups}"
    )
    row.notes.append(f"2,049 messages: {over.status} {code}")
    row.notes.append(
        f"grew a session to {grown:,} messages in {len(turns)} turns (slowest "
        f"{max(turns, default=0):.2f} s); follow-up {last.status} in {last.seconds:.2f} s; "
        f"GET its messages {listing.status} in {listing.seconds:.2f} s ({listed:,} listed, "
        f"{len(listing.body) / 1e6:.1f} MB)"
    )
    if over.status == 400 and code != "array_above_max_length":
        row.problems.append(f"2,049 messages refused with code {code}")


# -- 3. slow and partial requests --------------------------------------------------------------

_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
)
_SLOW_KINDS = {
    # kind: (sent at once, trickled one byte per interval, interval)
    "slowloris": (b"", b"POST /v1/chat/completions HTTP/1.1\r\n" + b"X-Pad: a\r\n" * 200, 2.0),
    "partial body": (_HEAD + b'{"model": "veil", "mess', b"", 0.0),
    "silent": (b"", b"", 0.0),
    "slow body": (_HEAD, b'{"model": "veil", "messages": ' + b" " * 1000, 1.0),
}


async def _slow_client(
    port: int, kind: str, source: str, deadline: float
) -> tuple[str, float | None, float | None]:
    """One slow connection: how it ended ("cut" without an answer, a status, or still
    "open" at the deadline), when the answer came and when the server closed it."""
    at_once, trickle, interval = _SLOW_KINDS[kind]
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except OSError as error:
        return f"connect failed: {type(error).__name__}", None, None
    writer.write(at_once)
    sent, data = 0, b""
    answered = closed = None
    try:
        while (left := deadline - time.monotonic()) > 0:
            wait = min(left, interval) if trickle else left
            try:
                chunk = await asyncio.wait_for(reader.read(4096), wait)
            except TimeoutError:
                if trickle and sent < len(trickle):
                    writer.write(trickle[sent : sent + 1])
                    sent += 1
                continue
            if not chunk:
                break
            answered = answered or time.monotonic() - t0
            data += chunk
    except ConnectionError:
        pass
    finally:
        if time.monotonic() < deadline:
            closed = time.monotonic() - t0
        writer.close()
    status = re.match(rb"HTTP/1\.1 (\d{3})", data)
    outcome = status.group(1).decode() if status else "cut" if closed is not None else "open"
    return outcome, answered, closed


def slow(ctx: Ctx, row: Row) -> None:
    seconds = 4.0 if ctx.quick else 10.0
    timeouts = {"header_timeout": seconds, "body_timeout": seconds}
    per_kind = 50 if ctx.quick else 200
    with ctx.stage(config=config(ctx.upstream.base_url, server=timeouts)) as stage:
        stage.idle(ctx.idle)
        stage.begin()
        deadline = time.monotonic() + seconds + 25

        async def all_of_them() -> list[tuple[str, tuple[str, float | None, float | None]]]:
            kinds = [kind for kind in _SLOW_KINDS for _ in range(per_kind)]
            results = await asyncio.gather(
                *(
                    _slow_client(
                        stage.port,
                        kind,
                        f"127.0.{20 + list(_SLOW_KINDS).index(kind)}.{1 + i % per_kind // PER_ADDRESS}",
                        deadline,
                    )
                    for i, kind in enumerate(kinds)
                )
            )
            return list(zip(kinds, results, strict=True))

        results = asyncio.run(all_of_them())
        stage.end()
    stage.measure(row)
    row.notes.append(
        f"header_timeout and body_timeout {seconds:.0f} s (config); {per_kind} connections "
        "of each kind, each kind from its own address"
    )
    for kind in _SLOW_KINDS:
        mine = [r for k, r in results if k == kind]
        outcomes = Counter(outcome for outcome, _, _ in mine)
        ended = [a if a is not None else c for _, a, c in mine if a is not None or c is not None]
        closed = [c for _, _, c in mine if c is not None]
        note = f"{kind}: " + ", ".join(f"{k} x{v}" for k, v in outcomes.most_common())
        note += f"; answered or cut after p50 {pct(ended, 50) or 0:.1f} s, last "
        note += f"{max(ended, default=0):.1f} s; closed by {max(closed, default=0):.1f} s"
        row.notes.append(note)
        late = [s for s in ended if s > seconds + 5]
        if late:
            row.problems.append(
                f"{kind}: {len(late)} answered or cut more than 5 s after the {seconds:.0f} s timeout"
            )
        for outcome, answered, _ in mine:
            row.cases += 1
            if outcome == "open":
                row.hangs += 1
            elif outcome.isdigit():
                row.count(int(outcome))
                if int(outcome) >= 500:
                    row.problems.append(f"{kind}: {outcome} after {answered or 0:.1f} s")
            elif outcome != "cut":
                row.statuses["no answer"] += 1
    if row.hangs:
        row.problems.append(
            f"{row.hangs} slow connections neither answered nor cut in {seconds + 25:.0f} s"
        )


# -- 4. connection flood -----------------------------------------------------------------------


def _ask_closed(holders: list[Child]) -> int:
    for holder in holders:
        holder.send("count\n")
    return sum(int(holder.read_line(timeout=PATIENCE).split()[1]) for holder in holders)


def flood(ctx: Ctx, row: Row) -> None:
    target = 2_000 if ctx.quick else FLOOD
    _, hard = raise_open_files()
    per_holder = max(1_000, min(hard, 1 << 20) - 256)  # headroom for the helper itself
    n_holders = -(-target // per_holder)
    header_timeout = 10.0
    with ctx.stage() as stage:
        stage.idle(ctx.idle)
        stage.begin()
        t0 = time.monotonic()
        holders = []
        for i in range(n_holders):
            count = min(per_holder, target - i * per_holder)
            cmd = [sys.executable, str(Path(__file__).parent / "_abuse_flood.py")]
            cmd += [str(stage.port), str(count), f"127.{10 + i}.0.1", str(PER_ADDRESS)]
            holders.append(ctx.reaper.helper(cmd))
        opened = failed = 0
        for holder in holders:
            try:
                line = holder.read_line(timeout=10 * PATIENCE).split()
            except AssertionError:
                line = []
            if not line or line[0] != "opened":
                raise RuntimeError(f"a flood helper failed: {line}")
            opened, failed = opened + int(line[1]), failed + int(line[3])
        t_flooded = time.monotonic()
        log(f"  {opened:,} idle connections open in {t_flooded - t0:.1f} s ({failed} failed)")
        valid = http_request(stage.port, "POST", CHAT, {"model": "veil", "messages": [user("hi")]})
        sid = (valid.json() or {}).get("session_id")
        again = http_request(
            stage.port,
            "POST",
            CHAT,
            {"model": "veil", "messages": [user("again")], "session_id": sid},
        )
        closed_then = _ask_closed(holders)
        log(
            f"  valid chat: {valid.status} in {valid.seconds * 1e3:.0f} ms; server had closed {closed_then:,}"
        )
        all_closed: float | None = None
        while time.monotonic() - t_flooded < header_timeout + 10:
            if _ask_closed(holders) >= opened:
                all_closed = time.monotonic() - t_flooded
                break
            time.sleep(0.25)
        closed_last = _ask_closed(holders)
        for holder in holders:
            holder.finish(timeout=30)
        stage.end()
    stage.measure(row)
    row.cases = opened + 2
    for answer in (valid, again):
        row.count(answer)
        if answer.status != 200:
            row.problems.append(
                f"a valid chat after the flood: {answer.status} {answer.body[:120]!r}"
            )
    row.recover = all_closed
    row.notes.append(
        f"{opened:,} idle connections ({failed} failed to open) in {t_flooded - t0:.1f} s from "
        f"{n_holders} helper processes, {PER_ADDRESS} per source address; open-file limit "
        f"{hard:,} per process"
    )
    row.notes.append(
        f"valid chat after it: {valid.status} in {valid.seconds * 1e3:.0f} ms, the next "
        f"{again.status} in {again.seconds * 1e3:.0f} ms; by then the server had closed "
        f"{closed_then:,} idle ones (room made at its connection cap)"
    )
    shed = f"{all_closed:.1f} s" if all_closed is not None else "not within the wait"
    row.notes.append(f"recover = until the server had closed every idle connection: {shed}")
    if all_closed is None:
        row.problems.append(f"{opened - closed_last:,} idle connections still open")


# -- 5. nested calculator expressions ----------------------------------------------------------


def calc(ctx: Ctx, row: Row) -> None:
    with ctx.stage(config=config(ctx.upstream.base_url, calculator=True)) as stage:
        stage.idle(ctx.idle)
        stage.begin()
        results = []
        for i, (label, _) in enumerate(CALCULATOR_CASES):
            body = {"model": "calc", "messages": [user(f"calc case {i}")]}
            answer = http_request(stage.port, "POST", CHAT, body)
            row.cases += 1
            row.count(answer)
            reply = answer.json() or {}
            content = ((reply.get("choices") or [{}])[0].get("message") or {}).get("content")
            text = content if answer.status == 200 else str(reply.get("error") or answer.body[:120])
            results.append((label, answer, str(text)))
            log(f"  {label:28} {answer.status} {answer.seconds:6.2f} s  {str(text)[:90]!r}")
            if answer.status != 200:
                row.problems.append(f"calculator {label}: {answer.status} {text[:120]}")
        stage.end()
    stage.measure(row)
    seconds = [a.seconds for _, a, _ in results]
    label, worst, _ = max(results, key=lambda r: r[1].seconds)
    row.notes.append(
        f"turn p50 {pct(seconds, 50) or 0:.2f} s, worst {worst.seconds:.2f} s ({label})"
    )
    answered = [t for _, a, t in results if a.status == 200 and t.startswith("calculated:")]
    row.notes.append(f"the tool answered {len(answered)} of {len(results)} turns (result or error)")
    for label, answer, text in results[:2]:
        row.notes.append(f"{label} -> {text[:100]!r}")
    slow_turns = [(label, a.seconds) for label, a, _ in results if a.seconds > 5]
    for label, s in slow_turns:
        row.problems.append(f"calculator {label}: turn took {s:.1f} s")


# -- 6. cross-site requests with authentication off --------------------------------------------


def xsite(ctx: Ctx, row: Row) -> None:
    marker = f"xsite-probe-{ctx.seed}"
    with ctx.stage() as stage:
        stage.idle(ctx.idle)
        stage.begin()
        refused, outcomes = 0, {}
        # Repeated, so that the prober and the bystander see more than a blink of it.
        rounds, least = 0, 1.5 if ctx.quick else 3.0
        while rounds < 2 or time.monotonic() - stage.t_begin < least:
            rounds += 1
            for label, method, path, headers, body in cross_site_cases(marker):
                answer = http_request(stage.port, method, path, body, headers)
                row.cases += 1
                row.count(answer)
                code = ((answer.json() or {}).get("error") or {}).get("code")
                outcomes[label] = f"{label} {answer.status}"
                if answer.status in (403, 415):
                    refused += 1
                else:
                    row.problems.append(f"cross-site {label}: {answer.status} {code}")
        control = http_request(
            stage.port, "POST", CHAT, {"model": "veil", "messages": [user("local")]}
        )
        collections = http_request(stage.port, "GET", "/v1/knowledge")
        ran = ctx.chat_requests(marker)
        stage.end()
    stage.measure(row)
    names = {c.get("name") for c in (collections.json() or {}).get("data") or []}
    row.notes.append(f"{len(outcomes)} distinct requests, sent {rounds} times each")
    row.notes.append(
        f"refused {refused} of {row.cases}; turns run for them: {ran}; a local program's chat "
        f"meanwhile: {control.status}; knowledge collections: {sorted(names) or 'none'}"
    )
    row.notes.append("statuses: " + ", ".join(outcomes.values()))
    if ran:
        row.problems.append(f"{ran} cross-site requests reached the upstream")
    if control.status != 200:
        row.problems.append(f"a local chat got {control.status}")
    if "notes" in names:
        row.problems.append("a cross-site upload created a knowledge collection")


# -- 7. crash mid-turn, then restart -----------------------------------------------------------

TOKEN_DELAY = 0.25


def _stream_until(
    port: int, body: dict[str, Any], chunks: int
) -> tuple[http.client.HTTPConnection, int]:
    """Start a streamed turn and read until `chunks` content deltas arrived; the open connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PATIENCE)
    conn.request("POST", CHAT, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"streamed turn: {response.status} {response.read()[:200]!r}")
    seen = 0
    while seen < chunks:
        line = response.readline()
        if not line:
            break
        if re.search(rb'"content":\s*"[^"]', line):
            seen += 1
    return conn, seen


def crash(ctx: Ctx, row: Row) -> None:
    crashes = 1 if ctx.quick else 2
    with FakeOpenAI() as slow_upstream:
        slow_upstream.inject(Fault(token_delay=TOKEN_DELAY), times=None)
        conf = config(ctx.upstream.base_url, slow=slow_upstream.base_url)
        with ctx.stage(config=conf) as stage:
            stage.idle(ctx.idle)
            stage.begin()
            first = http_request(
                stage.port, "POST", CHAT, {"model": "slow", "messages": [user("Hello.")]}
            )
            row.cases += 1
            row.count(first)
            sid = (first.json() or {}).get("session_id")
            if sid is None:
                raise RuntimeError(f"first turn: {first.status} {first.body[:200]!r}")
            worst = 0.0
            for k in range(crashes):
                words = " ".join(f"word{i}" for i in range(60)) + f" crash{k}"
                body = {
                    "model": "slow",
                    "messages": [user(words)],
                    "session_id": sid,
                    "stream": True,
                }
                conn, seen = _stream_until(stage.port, body, 3)
                veil = stage.veil
                assert veil is not None
                ctx.reaper.note_children(veil)
                t_kill = time.monotonic()
                veil.kill()  # SIGKILL mid-turn: no chance to close the turn
                conn.close()
                ctx.reaper.end_strays()  # its nats-server follows it (and anything else)
                t_start = time.monotonic()
                startup = stage.start_veil(port=stage.port)
                t_up = time.monotonic()
                attempts: list[str] = []
                t_ok = None
                while time.monotonic() - t_kill < 120:
                    answer = http_request(
                        stage.port,
                        "POST",
                        CHAT,
                        {"model": "slow", "messages": [user("Back?")], "session_id": sid},
                    )
                    row.count(answer)
                    attempts.append(f"{answer.status}/{answer.seconds:.1f}s")
                    if answer.status == 200:
                        t_ok = time.monotonic()
                        break
                    time.sleep(0.2)
                stage.outages.append((t_kill, t_ok or time.monotonic()))
                row.cases += 1
                recovered = (t_ok or time.monotonic()) - t_kill
                worst = max(worst, recovered)
                row.notes.append(
                    f"crash {k + 1} after {seen} streamed chunks: the old nats-server gone "
                    f"{t_start - t_kill:.1f} s, veil serve up {startup:.1f} s later, then the "
                    f"session's next turn took {(t_ok or time.monotonic()) - t_up:.1f} s "
                    f"(attempts {', '.join(attempts)})"
                )
                if t_ok is None:
                    row.problems.append(f"crash {k + 1}: the session never answered again")
                log(f"  crash {k + 1}: recovered in {recovered:.1f} s")
            events = replay(sid, stage.env)
            stage.end()
        stage.measure(row)
    row.recover = worst
    started = {
        e["turn_id"]: " ".join(m.get("content") or "" for m in e.get("messages", []))
        for e in events
        if e.get("type") == "turn.started"
    }
    failed = {e["turn_id"]: e.get("code") for e in events if e.get("type") == "turn.failed"}
    for k in range(crashes):
        cut = [turn for turn, text in started.items() if f"crash{k}" in text]
        codes = [failed.get(turn) for turn in cut]
        row.notes.append(f"replay: the turn cut by crash {k + 1} ended as {codes or 'missing'}")
        if codes != ["worker_lost"]:
            row.problems.append(f"crash {k + 1}: the cut turn reads {codes}, not worker_lost")


# -- 8. nats-server killed under load ----------------------------------------------------------


def _acknowledged_missing(stage: Stage, samples: list[dict[str, Any]]) -> tuple[int, list[str]]:
    """Chats answered 200 (with the right reply), and those not completed in their log."""
    acked = [s for s in samples if s["outcome"] == 200 and s.get("ok")]
    sessions = sorted({s["session"] for s in acked})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        logs = dict(
            zip(sessions, pool.map(lambda sid: replay(sid, stage.env), sessions), strict=True)
        )
    missing = []
    for sample in acked:
        events = logs[sample["session"]]
        done = {e["turn_id"] for e in events if e.get("type") == "reply.completed"}
        turns = [
            e["turn_id"]
            for e in events
            if e.get("type") == "turn.started"
            and any(m.get("content") == sample["text"] for m in e.get("messages", []))
        ]
        if not any(turn in done for turn in turns):
            missing.append(sample["text"])
    return len(acked), missing


def natskill(ctx: Ctx, row: Row) -> None:
    kills = 1 if ctx.quick else 2
    with ctx.stage() as stage:
        stage.idle(ctx.idle)
        loaders = [Client(ctx.reaper, "chat", stage.port, 0.0, tag=f"load{i}") for i in range(4)]
        stage.begin()
        time.sleep(2.0 if ctx.quick else 3.0)
        kill_times = []
        for k in range(kills):
            pid = stage.nats_pid()
            assert stage.veil is not None
            ctx.reaper.note_children(stage.veil)
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            kill_times.append(t_kill)
            t_ok = None
            while time.monotonic() - t_kill < 60:
                answer = http_request(
                    stage.port,
                    "POST",
                    CHAT,
                    {"model": "veil", "messages": [user("up?")]},
                    timeout=PATIENCE,
                )
                if answer.status == 200:
                    t_ok = time.monotonic()
                    break
                time.sleep(0.05)
            stage.outages.append((t_kill, t_ok or time.monotonic()))
            back = (t_ok or time.monotonic()) - t_kill
            log(f"  kill {k + 1}: chats answer again after {back:.1f} s")
            row.notes.append(
                f"kill {k + 1} at {t_kill - stage.t_begin:.1f} s into the abuse; a new chat "
                f"answered {back:.1f} s later"
            )
            time.sleep(3.0)
        samples = [s for loader in loaders for s in loader.finish()]
        ctx.reaper.note_children(stage.veil)
        stage.end()
        acked, missing = _acknowledged_missing(stage, samples)
    stage.measure(row)
    for sample in samples:
        row.cases += 1
        overlaps = stage.in_outage(sample)
        row.count(Answer(sample["outcome"], sample["s"]), outage=overlaps)
        if sample["outcome"] == 200 and not sample.get("ok"):
            row.problems.append(f"{sample.get('text')}: 200 with the wrong reply")
        if sample["outcome"] not in (200, 503) or sample["outcome"] == 503 and not overlaps:
            row.problems.append(
                f"{sample.get('text')}: {sample['outcome']} after {sample['s']:.1f} s"
            )
    recoveries = []
    for t_kill in kill_times:
        after = [
            s["t"] + s["s"] - t_kill for s in samples if s["outcome"] == 200 and s["t"] >= t_kill
        ]
        recoveries.append(min(after) if after else None)
    row.recover = max((r for r in recoveries if r is not None), default=None)
    after = ", ".join(f"{r:.1f} s" if r is not None else "never" for r in recoveries)
    statuses = Counter(str(s["outcome"]) for s in samples).most_common()
    row.notes.append(
        f"{kills} kill(s) of nats-server under 4 clients chatting back to back; "
        f"their chats answered again after {after}"
    )
    row.notes.append("load statuses: " + ", ".join(f"{k} x{v}" for k, v in statuses))
    row.notes.append(
        f"acknowledged turns: {acked}, missing from their session's log: {len(missing)}"
    )
    if missing:
        row.problems.append(f"{len(missing)} acknowledged turns lost: {missing[:5]}")
    if None in recoveries:
        row.problems.append("chats did not recover after a kill")


# -- the suite ---------------------------------------------------------------------------------

SCENARIOS: dict[str, tuple[str, Callable[[Ctx, Row], None]]] = {
    "malformed": ("malformed and deeply nested JSON", malformed),
    "huge": ("huge message counts", huge),
    "slow": ("slow and partial requests", slow),
    "flood": ("20,000 idle connections, then a chat", flood),
    "calc": ("nested calculator expressions", calc),
    "xsite": ("cross-site requests, auth off", xsite),
    "crash": ("crash mid-turn, then restart", crash),
    "natskill": ("nats-server killed under load", natskill),
}


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.01:
        return f"{seconds * 1e3:.1f}"
    return f"{seconds * 1e3:.0f}" if seconds < 10 else f"{seconds:.0f}s"


HEADER = (
    f"{'scenario':10} {'cases':>6} {'2xx':>5} {'4xx':>6} {'5xx':>4} {'503out':>6} {'noans':>5} "
    f"{'hangs':>5} {'recover':>8} | {'health ms: idle':>15} {'p50':>5} {'worst':>6} {'x idle':>6} "
    f"{'fail':>4} | {'bystander ms: p50':>17} {'worst':>6} {'fail':>4} | check"
)


def table_line(row: Row) -> str:
    if row.error is not None and row.cases == 0:
        return f"{row.name:10} ERROR: {row.error}"
    s = row.statuses
    health, bys = row.health, row.bystander
    ratio = (
        f"{health.worst / row.idle_p50:.0f}x" if health and health.worst and row.idle_p50 else "-"
    )
    check = "ERROR" if row.error is not None else "ok"
    if row.problems:
        check = f"{check + ', ' if row.error else ''}{len(row.problems)} problem(s)"
    return (
        f"{row.name:10} {row.cases:>6} {s['2xx']:>5} {s['4xx']:>6} {s['5xx']:>4} "
        f"{s['503 outage']:>6} {s['no answer']:>5} {row.hangs:>5} "
        f"{'-' if row.recover is None else f'{row.recover:.1f} s':>8} | "
        f"{_ms(row.idle_p50):>15} {_ms(health.p50 if health else None):>5} "
        f"{_ms(health.worst if health else None):>6} {ratio:>6} "
        f"{health.failures if health else '-':>4} | "
        f"{_ms(bys.p50 if bys else None):>17} {_ms(bys.worst if bys else None):>6} "
        f"{bys.failures if bys else '-':>4} | {check}"
    )


def run(ctx: Ctx, name: str) -> Row:
    title, scenario = SCENARIOS[name]
    log(f"== {name}: {title}")
    ctx.upstream.reset()
    row = Row(name)
    t0 = time.monotonic()
    try:
        scenario(ctx, row)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001 - one scenario's failure is its row's, not the suite's
        row.error = f"{type(error).__name__}: {error}"[:300]
        log(traceback.format_exc())
    row.seconds = time.monotonic() - t0
    log(f"   done in {row.seconds:.0f} s")
    print(f"\n{name}: {title} ({row.seconds:.0f} s)")
    print(HEADER)
    print(table_line(row))
    for note in row.notes:
        print(f"  - {note}")
    if row.error:
        print(f"  ! error: {row.error}")
    for problem in row.problems[:12]:
        print(f"  ! {problem}")
    if len(row.problems) > 12:
        print(f"  ! ... and {len(row.problems) - 12} more")
    sys.stdout.flush()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts: a smoke run")
    parser.add_argument("--only", help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    parser.add_argument("--seed", type=int, default=1, help="for the malformed bodies")
    args = parser.parse_args(argv)
    names = list(SCENARIOS) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    clean_environment()
    raise_open_files()

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    # Even where SIGINT came ignored (a job started with & by a script), Ctrl-C stops the suite.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    reaper = Reaper()
    rows: list[Row] = []
    t0 = time.monotonic()
    try:
        with FakeOpenAI(reply=upstream_reply) as upstream:
            ctx = Ctx(reaper, upstream, args.quick, args.seed)
            for name in names:
                rows.append(run(ctx, name))
                reaper.reap()
    except KeyboardInterrupt:
        log("interrupted: stopping everything started")
        return 130
    finally:
        reaper.reap()
    print(
        f"\nSummary ({'quick' if args.quick else 'full'} run, seed {args.seed}, {time.monotonic() - t0:.0f} s, {os.cpu_count()} cores)"
    )
    print(HEADER)
    for row in rows:
        print(table_line(row))
    troubled = [row for row in rows if row.problems or row.error]
    for row in troubled:
        print(f"  {row.name}: {row.error or ''}{'; '.join(row.problems[:4])}")
    return 1 if troubled else 0


if __name__ == "__main__":
    sys.exit(main())
