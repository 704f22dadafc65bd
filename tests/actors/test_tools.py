"""The built-in tools and the worker processes that run them, without a bus."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from actors.tools.actor import MAX_RESULT_CHARS, ToolActor, run_tool
from actors.tools.builtin import BUILTIN, Tool, ToolError, calculate
from actors.tools.custom import python_tool
from actors.tools.sandbox import WorkerPool
from config.targets import load_callable
from contracts.tools import RunTool, ToolRan


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("17 * 23", "391"),
        ("2 ^ 10", "1024"),
        ("(1 + 2) / 4", "0.75"),
        ("sqrt(16) - -1", "5"),
        ("7 // 2 + 7 % 2", "4"),
    ],
)
def test_calculator(expression: str, value: str) -> None:
    assert calculate(expression) == value


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')",
        "open('x')",
        "a + 1",
        "9 ** 9 ** 9",
        "1 / 0",
        "x" * 600,
        "[1, 2]",
        "True + 1",
    ],
)
def test_calculator_refuses_anything_but_arithmetic(expression: str) -> None:
    with pytest.raises(ToolError):
        calculate(expression)


async def test_run_tool_turns_every_failure_into_a_result() -> None:
    calc = BUILTIN["calculator"]
    assert (await run_tool(calc, '{"expression": "2+2"}', 5)).content == "4"
    assert "not valid JSON" in str((await run_tool(calc, "{oops", 5)).error)
    assert "bad arguments" in str((await run_tool(calc, '{"expr": "1"}', 5)).error)
    assert "JSON object" in str((await run_tool(calc, "[1]", 5)).error)
    assert (
        await run_tool(BUILTIN["current_time"], '{"timezone": "Mars/Olympus"}', 5)
    ).error == "unknown time zone 'Mars/Olympus'"


async def test_a_slow_tool_times_out_as_a_tool_error() -> None:
    import time

    slow = Tool(
        name="slow", description="sleeps", parameters={"type": "object"}, run=lambda: time.sleep(1)
    )
    ran = await run_tool(slow, "{}", 0.1)
    assert ran.error == "the tool did not finish within 0.1 s" and ran.duration_ms < 900


# --- The calculator's size and depth bounds -------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "refusal"),
    [
        ("((9**1000)**1000)**8", "the power would be larger than 10000 bits (about 3010 digits)"),
        ("2 ** 10001", "the power would be larger than 10000 bits (about 3010 digits)"),
        ("7 ** 4000", "the power would be larger than 10000 bits (about 3010 digits)"),
        ("3**6300 * 3**6300", "the product would be larger than 10000 bits (about 3010 digits)"),
        ("2**9999 + 2**9999", "the result would be larger than 10000 bits (about 3010 digits)"),
        ("round(5, -10**4)", "round() takes a whole number of digits within ±3010"),
        ("round(1.5, 0.5)", "round() takes a whole number of digits within ±3010"),
        ("-" * 300 + "1", "the expression is nested more than 260 deep"),
        ("1e308 ** 1e308", "the result is too large for a floating-point number"),
        ("(-8) ** (1/3)", "the result is not a real number"),
        ("sqrt(1, 2)", "sqrt(): math.sqrt() takes exactly one argument (2 given)"),
    ],
)
def test_calculator_refuses_what_would_grow_too_large(expression: str, refusal: str) -> None:
    with pytest.raises(ToolError) as refused:
        calculate(expression)
    assert str(refused.value) == refusal


def test_calculator_computes_up_to_its_bound() -> None:
    assert calculate("2 ** 9999") == str(2**9999)
    assert calculate("3**6300 // 3**6299") == "3"
    assert calculate("round(3**20, -5)") == "3486800000"
    assert calculate("+".join(["1"] * 200)) == "200"


# --- Tools in worker processes ----------------------------------------------------------------

# Only a hang detector: no test waits for it to pass.
HANG = 60.0


def whoami() -> str:
    """The pid of the process this runs in."""
    return str(os.getpid())


def spin(pidfile: str) -> str:
    """Write the pid of the process this runs in, then loop forever."""
    Path(pidfile + ".tmp").write_text(str(os.getpid()))
    os.replace(pidfile + ".tmp", pidfile)
    while True:
        pass


def die(marker: str, server: int) -> str:
    """Note that it ran, then end its process (unless that is the server's)."""
    with open(marker, "a") as file:
        file.write("ran\n")
    if os.getpid() == server:
        raise RuntimeError("ran in the server's process")
    os._exit(3)


def shaped(kind: str) -> Any:
    """Each way a tool can answer."""
    match kind:
        case "object":
            return {"n": 1, "path": Path("/tmp")}
        case "long":
            return "x" * (MAX_RESULT_CHARS + 10)
        case "refused":
            raise ToolError("not that")
        case "broken":
            raise ValueError("boom")
        case "noisy":
            print("this goes to stderr, not into the protocol")
            return "quiet"
    return kind


async def ashout(text: str) -> str:
    """A coroutine tool: runs on the tool actor's loop."""
    return text.upper()


def operator_tool(name: str) -> Tool:
    return python_tool(name, f"tests.actors.test_tools:{name}", None, None)


def exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def written_pid(pidfile: Path) -> int:
    async with asyncio.timeout(HANG):
        while not pidfile.exists():
            await asyncio.sleep(0.01)
    return int(pidfile.read_text())


def test_plain_tools_get_a_worker_target_and_coroutines_do_not() -> None:
    assert operator_tool("whoami").target == "tests.actors.test_tools:whoami"
    assert operator_tool("ashout").target is None
    for tool in BUILTIN.values():
        assert tool.contextual or (
            tool.target is not None and load_callable(tool.target) is tool.run
        )


async def test_results_keep_their_shape_through_a_worker() -> None:
    tool = operator_tool("shaped")
    async with WorkerPool(size=1) as pool:

        async def ran(kind: str) -> ToolRan:
            return await run_tool(tool, json.dumps({"kind": kind}), HANG, pool=pool)

        assert (await ran("object")).content == '{"n": 1, "path": "/tmp"}'
        assert (await ran("long")).content == "x" * MAX_RESULT_CHARS
        assert (await ran("refused")).error == "not that"
        assert (await ran("broken")).error == "the tool failed: ValueError('boom')"
        assert (await ran("noisy")).content == "quiet"
        wrong = await run_tool(tool, '{"sort": 1}', HANG, pool=pool)
        assert wrong.error == "bad arguments: shaped() got an unexpected keyword argument 'sort'"
        assert (await run_tool(operator_tool("ashout"), '{"text": "a"}', HANG)).content == "A"


async def test_a_spinning_tool_is_killed_at_its_timeout(tmp_path: Path) -> None:
    async with WorkerPool(size=2) as pool:
        pid = int((await run_tool(operator_tool("whoami"), "{}", HANG, pool=pool)).content)
        assert pid != os.getpid() and pool.pids == {pid}
        arguments = json.dumps({"pidfile": str(tmp_path / "pid")})
        ran = await run_tool(operator_tool("spin"), arguments, 0.5, pool=pool)
        assert ran.error == "the tool did not finish within 0.5 s"
        assert not exists(pid) and pool.pids == frozenset()


async def test_a_spinning_tool_blocks_no_other_call_and_stop_kills_every_worker(
    tmp_path: Path,
) -> None:
    tools = {"spin": operator_tool("spin"), "whoami": operator_tool("whoami"), **BUILTIN}
    actor = ToolActor(Client(), tools, version="test")
    pidfile = tmp_path / "pid"
    spinning = asyncio.create_task(
        actor.run(
            RunTool(name="spin", arguments=json.dumps({"pidfile": str(pidfile)}), timeout=HANG)
        )
    )
    spinner = await written_pid(pidfile)
    assert spinner != os.getpid()
    other = await actor.run(RunTool(name="whoami", arguments="{}", timeout=HANG))
    four = await actor.run(RunTool(name="calculator", arguments='{"expression": "2+2"}'))
    assert four.content == "4" and not spinning.done()
    await actor.stop()
    stopped = await spinning
    assert stopped.error == "the tool failed: its worker process stopped (killed by SIGKILL)"
    assert not exists(spinner) and not exists(int(other.content))


async def test_a_dead_worker_is_replaced() -> None:
    async with WorkerPool(size=1) as pool:
        first = int((await run_tool(operator_tool("whoami"), "{}", HANG, pool=pool)).content)
        assert first != os.getpid()
        os.kill(first, signal.SIGKILL)
        second = await run_tool(operator_tool("whoami"), "{}", HANG, pool=pool)
        assert second.error is None and int(second.content) not in (first, os.getpid())
        assert pool.pids == {int(second.content)}


async def test_a_tool_that_ends_its_worker_fails_once_and_is_not_run_again(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    async with WorkerPool(size=1) as pool:
        ran = await run_tool(
            operator_tool("die"),
            json.dumps({"marker": str(marker), "server": os.getpid()}),
            HANG,
            pool=pool,
        )
        assert ran.error == "the tool failed: its worker process stopped (exit code 3)"
        assert marker.read_text() == "ran\n"
        assert (
            await run_tool(BUILTIN["calculator"], '{"expression": "6*7"}', HANG, pool=pool)
        ).content == "42"


async def test_calls_beyond_the_pool_size_wait_for_a_worker() -> None:
    async with WorkerPool(size=2) as pool:
        answers = await asyncio.gather(
            *(run_tool(operator_tool("whoami"), "{}", HANG, pool=pool) for _ in range(6))
        )
        pids = {int(a.content) for a in answers}
        assert 1 <= len(pids) <= 2 and pool.pids == pids


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_workers_serve_a_loop_in_another_thread(kind: str, tmp_path: Path) -> None:
    """As Veil runs in the tests' VeilThread, and on uvloop in production."""
    new_loop = (
        pytest.importorskip("uvloop").new_event_loop if kind == "uvloop" else asyncio.new_event_loop
    )
    outcome: list[Any] = []

    async def scenario() -> None:
        async with WorkerPool(size=2) as pool:
            calc = await run_tool(BUILTIN["calculator"], '{"expression": "2**10"}', HANG, pool=pool)
            (pid,) = pool.pids
            arguments = json.dumps({"pidfile": str(tmp_path / "pid")})
            spun = await run_tool(operator_tool("spin"), arguments, 0.5, pool=pool)
            outcome.extend([calc.content, spun.error, exists(pid)])

    def serve() -> None:
        loop = new_loop()
        try:
            loop.run_until_complete(scenario())
        finally:
            loop.close()

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join(HANG)
    assert outcome == ["1024", "the tool did not finish within 0.5 s", False]


async def test_an_http_tool_argument_cannot_climb_out_of_its_url_template() -> None:
    """`{"item": ".."}` reached GET /api/: each argument must stay one path segment."""
    from aiohttp import web

    from actors.tools.custom import http_tool

    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        tool = http_tool(
            "price",
            url=f"http://127.0.0.1:{port}/api/price/{{item}}?currency={{currency}}",
            method="GET",
            headers={},
            description=None,
            parameters=None,
            timeout=5,
            max_bytes=100,
        )
        for item in ("..", ".", "../admin", "a/../../b", "%2e%2e", "tea"):
            ran = await run_tool(tool, json.dumps({"item": item, "currency": ".."}), 5)
            assert ran.content == "ok", ran
    finally:
        await runner.cleanup()
    assert seen == [
        "/api/price/%2E%2E?currency=%2E%2E",
        "/api/price/%2E?currency=%2E%2E",
        "/api/price/..%2Fadmin?currency=%2E%2E",
        "/api/price/a%2F..%2F..%2Fb?currency=%2E%2E",
        "/api/price/%252e%252e?currency=%2E%2E",
        "/api/price/tea?currency=%2E%2E",
    ]


def test_the_longest_plain_sum_is_not_too_deep() -> None:
    """A sum nests one level per term: every sum that fits MAX_LENGTH is allowed."""
    from actors.tools.builtin import MAX_LENGTH

    terms = (MAX_LENGTH + 1) // 2
    assert calculate("+".join(["1"] * terms)) == str(terms)


async def test_arguments_nested_too_deeply_are_a_clear_tool_error() -> None:
    deep = '{"expression": ' + "[" * 5000 + "]" * 5000 + "}"
    ran = await run_tool(BUILTIN["calculator"], deep, 5)
    assert ran.error == "arguments are nested too deeply"


def test_the_config_knows_every_built_in_tool_by_name() -> None:
    """The config checks pipelines' tool names without importing the tools themselves."""
    from contracts.tools import BUILTIN_TOOLS

    assert set(BUILTIN) == set(BUILTIN_TOOLS)
