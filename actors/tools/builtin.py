"""Built-in tools: a safe calculator and the current time in a zone."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

__all__ = ["BUILTIN", "Tool", "ToolError", "calculate"]


class ToolError(Exception):
    """A tool refused its arguments or failed; the model sees the message."""


class Tool(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[..., Any]
    # Receives the turn's scope as `context` (tenant, session_id, user_id): for tools that
    # search what belongs to the caller, never anyone else's.
    contextual: bool = False

    def schema(self) -> dict[str, Any]:
        """The tool as OpenAI's `tools` entry."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": round,
    "floor": math.floor,
    "ceil": math.ceil,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}
# Keeps 9**9**9 and friends from eating the worker.
MAX_EXPONENT = 1000
MAX_LENGTH = 500


def _eval(node: ast.AST) -> Any:
    match node:
        case ast.Expression(body=body):
            return _eval(body)
        case ast.Constant(value=value) if isinstance(value, int | float) and not isinstance(
            value, bool
        ):
            return value
        case ast.BinOp(left=left, op=op, right=right) if type(op) in _BINARY:
            a, b = _eval(left), _eval(right)
            if isinstance(op, ast.Pow) and abs(b) > MAX_EXPONENT:
                raise ToolError(f"exponent {b} is too large")
            return _BINARY[type(op)](a, b)
        case ast.UnaryOp(op=op, operand=operand) if type(op) in _UNARY:
            return _UNARY[type(op)](_eval(operand))
        case ast.Name(id=name) if name in _CONSTANTS:
            return _CONSTANTS[name]
        case ast.Call(func=ast.Name(id=name), args=args, keywords=[]) if name in _FUNCTIONS:
            return _FUNCTIONS[name](*(_eval(a) for a in args))
        case _:
            raise ToolError(f"not allowed in an expression: {ast.dump(node)[:80]}")


def calculate(expression: str) -> str:
    """Evaluate arithmetic without eval: numbers, + - * / // % **, a few math functions."""
    if len(expression) > MAX_LENGTH:
        raise ToolError("expression too long")
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
    except SyntaxError as error:
        raise ToolError(f"not an arithmetic expression: {error.msg}") from None
    try:
        value = _eval(tree)
    except (ZeroDivisionError, OverflowError, ValueError) as error:
        raise ToolError(str(error)) from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


def current_time(timezone: str = "UTC") -> str:
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(f"unknown time zone {timezone!r}") from None
    return datetime.now(UTC).astimezone(zone).isoformat(timespec="seconds")


def _runs_in_the_tool_actor(**_: Any) -> str:
    raise ToolError("this tool runs in the tool actor, which binds it to the memory actor")


BUILTIN: dict[str, Tool] = {
    "calculator": Tool(
        name="calculator",
        description="Evaluate an arithmetic expression exactly, e.g. '(17.5 * 4) / 3' or 'sqrt(2) ** 10'.",
        parameters={
            "type": "object",
            "properties": {
                "expression": {"type": "string", "description": "The expression to evaluate."}
            },
            "required": ["expression"],
        },
        run=calculate,
    ),
    "memory_search": Tool(
        name="memory_search",
        description="Search what this user said earlier (this conversation and, if known, the user's others).",
        parameters={
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to look for."},
                "k": {"type": "integer", "description": "How many memories (default 5)."},
            },
            "required": ["query"],
        },
        run=_runs_in_the_tool_actor,
        contextual=True,
    ),
    "knowledge_search": Tool(
        name="knowledge_search",
        description="Search the knowledge base of this assistant; returns numbered passages with their sources.",
        parameters={
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to look for."},
                "k": {"type": "integer", "description": "How many passages (default 4)."},
            },
            "required": ["query"],
        },
        run=_runs_in_the_tool_actor,
        contextual=True,
    ),
    "current_time": Tool(
        name="current_time",
        description="The current date and time in an IANA time zone, e.g. 'Europe/Paris'.",
        parameters={
            "type": "object",
            "properties": {
                "timezone": {"type": "string", "description": "IANA zone name; default UTC."}
            },
        },
        run=current_time,
    ),
}
