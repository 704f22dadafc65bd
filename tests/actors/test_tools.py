"""The built-in tools, without a bus."""

from __future__ import annotations

import pytest

from actors.tools.actor import run_tool
from actors.tools.builtin import BUILTIN, ToolError, calculate


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

    from actors.tools.builtin import Tool

    slow = Tool(
        name="slow", description="sleeps", parameters={"type": "object"}, run=lambda: time.sleep(1)
    )
    ran = await run_tool(slow, "{}", 0.1)
    assert ran.error == "the tool did not finish within 0.1 s" and ran.duration_ms < 900
