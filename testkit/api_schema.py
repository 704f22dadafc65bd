"""Real answers checked against Veil's own /openapi.json, for tests and benchmarks.

`closed(doc)` refuses unknown fields in every object the document describes with
`properties` (the published document leaves them open, as OpenAI's does): a key that a
handler adds to a dict but not to its type in edge/responses.py fails the check.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import jsonschema_rs
import msgspec

__all__ = [
    "check_headers",
    "check_response",
    "closed",
    "event_data",
    "operation_of",
    "response_schema",
]


def closed(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of the document whose object schemas refuse properties they do not name."""
    out = copy.deepcopy(doc)
    stack: list[Any] = [out["components"]["schemas"]]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out


def operation_of(doc: dict[str, Any], template: str, method: str) -> dict[str, Any]:
    operation: dict[str, Any] = doc["paths"][template][method.lower()]
    return operation


def _resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def response_schema(
    doc: dict[str, Any], template: str, method: str, status: int, media: str
) -> dict[str, Any]:
    """The documented schema of an answer; AssertionError if the status or media type is
    not documented for the operation."""
    responses = operation_of(doc, template, method)["responses"]
    assert str(status) in responses, (
        f"{method} {template} answered {status}, not documented (has {sorted(responses)})"
    )
    response = _resolve(doc, responses[str(status)])
    content = response.get("content", {})
    assert media in content, f"{method} {template} {status}: {media} not documented"
    media_entry: dict[str, Any] = content[media]
    return media_entry


def _validate(doc: dict[str, Any], schema: dict[str, Any], value: Any, where: str) -> None:
    root = {**schema, "components": doc["components"]}
    errors = list(jsonschema_rs.Draft202012Validator(root).iter_errors(value))
    assert not errors, (
        f"{where}: {errors[0].message} at {list(errors[0].instance_path)}: {value!r:.500}"
    )


def check_headers(
    doc: dict[str, Any],
    template: str,
    method: str,
    status: int,
    headers: Mapping[str, str],
) -> list[str]:
    """The documented headers of an answer that it carries, each checked against its
    schema (an integer header must read as one); their names."""
    response = _resolve(doc, operation_of(doc, template, method)["responses"][str(status)])
    present = {name.lower(): value for name, value in headers.items()}
    found = []
    for name, entry in response.get("headers", {}).items():
        value = present.get(name.lower())
        if value is None:
            continue
        schema = _resolve(doc, entry)["schema"]
        typed: Any = value
        if schema.get("type") == "integer":
            assert value.strip().lstrip("-").isdigit(), f"{name}: {value!r} is not an integer"
            typed = int(value)
        _validate(doc, schema, typed, f"{method} {template} {status} header {name}")
        found.append(name)
    return found


def event_data(body: bytes) -> list[Any]:
    """The JSON data of each server-sent event, without the closing `[DONE]`."""
    events = []
    for line in body.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line.removeprefix("data: ")))
    return events


def check_response(
    doc: dict[str, Any],
    template: str,
    method: str,
    status: int,
    content_type: str,
    body: bytes,
) -> None:
    """The answer is documented for the operation and its body matches the schema (each
    event's data, for a stream). Give `closed(doc)` to refuse unknown fields too."""
    media = content_type.split(";")[0].strip()
    entry = response_schema(doc, template, method, status, media)
    where = f"{method} {template} {status} {media}"
    if media == "text/event-stream":
        data = entry["schema"]["properties"]["data"]
        # OpenAI's chat stream: JSON or `[DONE]`; streams named by `event:` have JSON only.
        item = (data["anyOf"][0] if "anyOf" in data else data)["contentSchema"]
        events = event_data(body)
        assert events, f"{where}: no events"
        for event in events:
            _validate(doc, item, event, where)
    elif media == "application/json":
        _validate(doc, entry["schema"], msgspec.json.decode(body), where)
