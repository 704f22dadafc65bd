"""Operator tools from the config: HTTP calls on a URL template, and Python callables."""

from __future__ import annotations

import inspect
import typing
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from actors.tools.builtin import Tool, ToolError
from config.targets import ENTRY_POINT_GROUP, load_callable

__all__ = ["ENTRY_POINT_GROUP", "http_tool", "python_tool", "schema_from_signature"]

_JSON_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    dict: "object",
}


def schema_from_signature(function: Any) -> dict[str, Any]:
    """A JSON Schema for a function's keyword arguments, from its type hints and defaults."""
    hints = typing.get_type_hints(function)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        hint = hints.get(name, str)
        origin = typing.get_origin(hint) or hint
        properties[name] = {"type": _JSON_TYPES.get(origin, "string")}
        if parameter.default is parameter.empty:
            required.append(name)
    return {"type": "object", "properties": properties, "required": required}


def python_tool(
    name: str, target: str, description: str | None, parameters: dict[str, Any] | None
) -> Tool:
    function = load_callable(target)
    if not callable(function):
        raise TypeError(f"{target!r} is not callable")
    return Tool(
        name=name,
        description=description or (inspect.getdoc(function) or name).splitlines()[0],
        parameters=parameters or schema_from_signature(function),
        run=function,
        # A plain function runs in a worker process that loads it by the same name, so that its
        # timeout can stop it; a coroutine function runs on the tool actor's event loop.
        target=None if inspect.iscoroutinefunction(function) else target,
    )


def _url_value(value: Any) -> str:
    """An argument as one URL component: '/' encoded, and '.' or '..' encoded too, so a
    value can never be a path segment that climbs out of the template."""
    text = quote(str(value), safe="")
    return text.replace(".", "%2E") if text in (".", "..") else text


def http_tool(
    name: str,
    *,
    url: str,
    method: str,
    headers: dict[str, str],
    description: str | None,
    parameters: dict[str, Any] | None,
    timeout: float,
    max_bytes: int,
) -> Tool:
    """A tool that fills the URL template with the (URL-encoded) arguments and returns the body."""
    fields = [f for _, f, _, _ in __import__("string").Formatter().parse(url) if f]
    schema = parameters or {
        "type": "object",
        "properties": {f: {"type": "string"} for f in fields},
        "required": fields,
    }

    async def call(**arguments: Any) -> str:
        try:
            filled = url.format(**{k: _url_value(v) for k, v in arguments.items()})
        except KeyError as missing:
            raise ToolError(f"missing argument {missing}") from None
        # As built: parsed again, `.../%2E%2E` would be resolved back up the path.
        target = URL(filled, encoded=True)
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        try:
            async with (
                aiohttp.ClientSession(timeout=client_timeout) as http,
                http.request(method, target, headers=headers) as response,
            ):
                body = await response.content.read(max_bytes + 1)
                text = body[:max_bytes].decode(response.charset or "utf-8", errors="replace")
                if len(body) > max_bytes:
                    text += f"\n[cut at {max_bytes} bytes]"
                if response.status >= 400:
                    raise ToolError(f"HTTP {response.status}: {text[:500]}")
                return text
        except TimeoutError:
            raise ToolError(f"no answer within {timeout:g} s") from None
        except aiohttp.ClientError as error:
            raise ToolError(f"request failed: {error}") from None

    return Tool(
        name=name, description=description or f"HTTP {method} {url}", parameters=schema, run=call
    )
