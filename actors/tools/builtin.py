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

__all__ = ["BUILTIN", "Tool", "ToolError", "calculate", "current_time"]


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
    # Where a fresh process finds `run`: "module:function" or a 'veil.tools' entry point. A tool
    # with one runs in a worker process that its timeout kills (actors/tools/sandbox.py).
    target: str | None = None

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


_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_LENGTH = 500
# Every integer the calculator makes is refused before it is computed if it would pass this:
# 10,000 bits (3,010 digits) is far past any arithmetic a chat needs, the costliest step on
# numbers that size (a product, a division, str()) takes microseconds, so a whole expression
# of MAX_LENGTH characters stays within milliseconds; and 3,010 digits stay under Python's
# 4,300-digit limit on int-to-str. `((9**1000)**1000)**8` once held the GIL for 13.9 s.
MAX_BITS = 10_000
MAX_DIGITS = 3_010
# A sum of terms nests one level per term: MAX_LENGTH characters make at most 250 of them,
# and that stays far enough from Python's recursion limit wherever `_eval` is called from.
MAX_DEPTH = MAX_LENGTH // 2 + 10


def _too_large(what: str) -> ToolError:
    return ToolError(f"{what} would be larger than {MAX_BITS} bits (about {MAX_DIGITS} digits)")


def _power(base: Any, exponent: Any) -> Any:
    # Only an integer to a positive integer power grows without bound; with floats the
    # exponent is converted and the result overflows to an OverflowError, in constant time.
    grows = isinstance(base, int) and isinstance(exponent, int) and exponent > 1 and abs(base) > 1
    # The first test keeps a 10,000-bit exponent out of the float product.
    if grows and (exponent > MAX_BITS or exponent * math.log2(abs(base)) > MAX_BITS):
        raise _too_large("the power")
    return base**exponent


def _product(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > MAX_BITS + 1:
        raise _too_large("the product")
    return a * b


def _round(number: Any, ndigits: Any = None) -> Any:
    if ndigits is None:
        return round(number)
    # round(5, -10**9) would build 10**(10**9) first.
    if not isinstance(ndigits, int) or abs(ndigits) > MAX_DIGITS:
        raise ToolError(f"round() takes a whole number of digits within ±{MAX_DIGITS}")
    return round(number, ndigits)


# Only ** and * are sized before they run: + and - add one bit at most, //, % and abs never
# grow an integer, and / and the math functions turn it into a float first, which raises
# OverflowError past 1e308 instead of working on it.
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: _product,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _power,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": _round,
    "floor": math.floor,
    "ceil": math.ceil,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
}


def _checked(value: Any) -> Any:
    if isinstance(value, complex):
        raise ToolError("the result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise _too_large("the result")
    return value


def _eval(node: ast.AST, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise ToolError(f"the expression is nested more than {MAX_DEPTH} deep")
    inner = depth + 1
    match node:
        case ast.Expression(body=body):
            return _eval(body, inner)
        case ast.Constant(value=value) if isinstance(value, int | float) and not isinstance(
            value, bool
        ):
            return _checked(value)
        case ast.BinOp(left=left, op=op, right=right) if type(op) in _BINARY:
            a, b = _eval(left, inner), _eval(right, inner)
            return _checked(_BINARY[type(op)](a, b))
        case ast.UnaryOp(op=op, operand=operand) if type(op) in _UNARY:
            return _UNARY[type(op)](_eval(operand, inner))
        case ast.Name(id=name) if name in _CONSTANTS:
            return _CONSTANTS[name]
        case ast.Call(func=ast.Name(id=name), args=args, keywords=[]) if name in _FUNCTIONS:
            values = [_eval(a, inner) for a in args]
            try:
                return _checked(_FUNCTIONS[name](*values))
            except TypeError as error:
                raise ToolError(f"{name}(): {error}") from None
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
    except OverflowError:
        # Float arithmetic says it in errno's words: "(34, 'Numerical result out of range')".
        raise ToolError("the result is too large for a floating-point number") from None
    except (ZeroDivisionError, ValueError) as error:
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
        target="actors.tools.builtin:calculate",
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
        target="actors.tools.builtin:current_time",
    ),
}
