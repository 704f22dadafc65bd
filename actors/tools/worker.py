"""A tool worker process: runs plain-function tools, one JSON line in and out per call.

Started by the pool in actors/tools/sandbox.py as `python -m actors.tools.worker <parent pid>`.
It imports no asyncio, aiohttp or NATS: a worker killed at a timeout is replaced, and every
replacement pays its start-up again (80 ms here, half of it the interpreter's own).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from actors.tools.builtin import ToolError
from config.targets import load_callable

__all__ = ["Call", "Raised", "Reply", "Returned", "Taken", "main"]


class Call(msgspec.Struct, frozen=True, kw_only=True):
    """Run `target` with `arguments` (a JSON object, as the model wrote it) as keywords."""

    target: str
    arguments: str
    # The result and error messages are cut here, before they cross the pipe.
    max_chars: int


class Reply(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """What a worker writes back."""


class Taken(Reply, tag="taken", frozen=True, kw_only=True):
    """Written before the tool runs: a worker that dies before this line never ran it."""


class Returned(Reply, tag="returned", frozen=True, kw_only=True):
    content: str


class Raised(Reply, tag="raised", frozen=True, kw_only=True):
    # "arguments": a TypeError, "refused": a ToolError, "failed": anything else (as its repr).
    reason: Literal["arguments", "refused", "failed"]
    message: str


def _run(call: Call, loaded: dict[str, Callable[..., Any]]) -> Returned | Raised:
    cut = call.max_chars
    try:
        function = loaded.get(call.target)
        if function is None:
            function = loaded[call.target] = load_callable(call.target)
        result = function(**json.loads(call.arguments))
        text = result if isinstance(result, str) else json.dumps(result, default=str)
    except TypeError as error:
        return Raised(reason="arguments", message=str(error)[:cut])
    except ToolError as error:
        return Raised(reason="refused", message=str(error)[:cut])
    except Exception as error:  # noqa: BLE001 - a tool's own bug is the model's to route around
        return Raised(reason="failed", message=repr(error)[:cut])
    return Returned(content=text[:cut])


def _die_with_parent(parent: int) -> None:
    """On Linux, have the kernel SIGKILL this worker when the server dies, even mid-tool."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def main() -> None:
    """Serve calls from stdin until it closes."""
    _die_with_parent(int(sys.argv[1]))
    calls = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    # A tool that prints or reads must not touch the protocol: its stdout goes to stderr.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    decoder = msgspec.json.Decoder(Call)
    encoder = msgspec.json.Encoder()
    taken = encoder.encode(Taken()) + b"\n"
    loaded: dict[str, Callable[..., Any]] = {}
    while line := calls.readline():
        call = decoder.decode(line)
        replies.write(taken)
        replies.flush()
        replies.write(encoder.encode(_run(call, loaded)) + b"\n")
        replies.flush()


if __name__ == "__main__":
    main()
