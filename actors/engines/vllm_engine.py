"""Engine that runs vLLM's async engine (v1 `AsyncLLM`) inside the model actor's process.

For a GPU node: the actor talks to vLLM directly instead of through an OpenAI-compatible
server, so a generation costs no extra HTTP hop. vLLM is an optional extra and is imported
only when the engine starts, so this module imports without it.

vLLM's front end (tokenizer, detokenizer, request queues) runs on this event loop; its
engine core runs in a child process that vLLM spawns and talks to over ZeroMQ. Starting it
(imports, model load, graph compilation, warm-up) took 50-70 s for SmolLM2 on 2 CPU cores,
15 s with extra_args={"enforce_eager": True}, so it runs in a worker thread, once, on the
first request or on `start()`; a failed start is tried again on the next request. Because
vLLM spawns (not forks) its child, the program that starts the engine must guard its
entry point with `if __name__ == "__main__"`.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import time
import uuid
from typing import Any

from actors.engines.base import DeltaSink, EngineError, EngineOutput, refuse_unsupported
from eventstore.events import ChatMessage, Usage

__all__ = ["VllmEngine"]

log = logging.getLogger(__name__)

# Client parameter -> vLLM SamplingParams field, where they differ only in name.
SAMPLING = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
# On the CPU, vLLM otherwise reserves 92% of the machine's memory (its
# gpu_memory_utilization) and refuses to start when that much is not free.
CPU_KV_CACHE_BYTES = 1 << 30
MEMORY_ARGS = frozenset({"kv_cache_memory_bytes", "gpu_memory_utilization"})


class VllmEngine:
    """One model served by an in-process vLLM; the `model` name a pipeline asks for is not checked."""

    def __init__(
        self,
        name: str,
        *,
        model: str,
        max_model_len: int = 4096,
        dtype: str = "auto",
        extra_args: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self._model = model
        self._max_model_len = max_model_len
        self._dtype = dtype
        self._extra_args = dict(extra_args or {})
        self._engine: Any = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self._built: Any = None  # handed from the worker thread to _start
        self._tokenizer: Any = None
        self._defaults: dict[str, Any] = {}
        self._starting: asyncio.Task[float] | None = None
        self._closed = False

    async def start(self) -> float:
        """Start vLLM now instead of on the first request; returns the seconds it took."""
        if self._closed:
            raise EngineError(503, "engine_closed", "The vLLM engine is closed.", detail=self.name)
        if self._starting is None:
            self._starting = asyncio.create_task(self._start())
        starting = self._starting
        try:
            # Shielded: a caller that gives up must not cancel a start others wait for.
            return await asyncio.shield(starting)
        except EngineError:
            if self._starting is starting:  # a failed start is tried again on the next call
                self._starting = None
            raise

    async def aclose(self) -> None:
        self._closed = True
        if self._starting is not None and not self._starting.done():
            # The worker thread cannot be interrupted: let it finish, then shut down.
            await asyncio.wait([self._starting])
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)

    def unfinished_requests(self) -> int:
        """Requests vLLM's front end still tracks (0 when idle or not started)."""
        return 0 if self._engine is None else int(self._engine.get_num_unfinished_requests())

    async def generate(
        self,
        model: str,
        messages: list[ChatMessage],
        params: dict[str, Any],
        on_delta: DeltaSink | None,
        output: EngineOutput,
    ) -> None:
        _check(params)  # a 400 needs no engine
        if self._engine is None:
            await self.start()
        engine = self._engine
        if engine is None:  # closed while starting
            raise EngineError(503, "engine_closed", "The vLLM engine is closed.", detail=self.name)
        prompt_ids = self._prompt(messages)
        room = self._max_model_len - len(prompt_ids)
        if room < 1:
            raise EngineError(
                400,
                "context_length_exceeded",
                f"The messages take {len(prompt_ids)} tokens; the model's context holds "
                f"{self._max_model_len}.",
            )
        sampling = self._sampling(params, room)
        request_id = f"veil-{uuid.uuid4().hex}"
        started = time.perf_counter()
        finished = False
        completion_tokens = 0
        prompt_tokens = len(prompt_ids)
        finish: str | None = None
        prompt = _vllm("vllm.inputs.engine").tokens_input(prompt_ids)
        stream = engine.generate(prompt, sampling, request_id)
        try:
            while True:  # past the finished update, so the stream ends by itself
                try:
                    update = await anext(stream)
                except StopAsyncIteration:
                    break
                except Exception as error:  # only vLLM's own failures are translated
                    raise _translate(error, self.name) from error
                if update.prompt_token_ids is not None:
                    prompt_tokens = len(update.prompt_token_ids)
                piece = update.outputs[0] if update.outputs else None
                if piece is not None:
                    completion_tokens += len(piece.token_ids)
                    finish = piece.finish_reason or finish
                    if piece.text:
                        if on_delta is not None and output.ttft_ms is None:
                            output.ttft_ms = (time.perf_counter() - started) * 1000
                        output.parts.append(piece.text)
                        if on_delta is not None:
                            await on_delta(piece.text)
                finished = finished or update.finished
        finally:
            if not finished:
                # Cancelled, or on_delta failed: free the sequence's slot and KV cache now.
                # What arrived so far stays in output.
                try:
                    await stream.aclose()
                    await engine.abort(request_id)
                except Exception:  # the engine may be dead or closing; nothing more to free
                    log.warning("vLLM abort of %s failed", request_id, exc_info=True)
        if finish == "abort":
            raise EngineError(503, "engine_aborted", "vLLM aborted the generation.", retryable=True)
        if finish == "error":
            raise EngineError(500, "engine_error", "vLLM failed the generation.", retryable=True)
        output.finish_reason = "length" if finish == "length" else "stop"
        output.usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    async def _start(self) -> float:
        began = time.perf_counter()
        # Importing vLLM takes seconds and loading blocks for the whole start: both run in a
        # worker thread (AsyncLLM supports being built off the event loop).
        await asyncio.to_thread(self._build)
        engine, self._built = self._built, None
        tokenizer = engine.get_tokenizer()
        problem = None
        if self._closed:
            problem = EngineError(
                503, "engine_closed", "The vLLM engine is closed.", detail=self.name
            )
        elif not getattr(tokenizer, "chat_template", None):
            problem = EngineError(
                503, "model_unavailable", "The model has no chat template.", detail=self._model
            )
        if problem is not None:
            await asyncio.to_thread(engine.shutdown)
            raise problem
        self._engine = engine
        self._tokenizer = tokenizer
        # The model's own sampling defaults (generation_config.json), as vLLM's server uses.
        self._defaults = dict(engine.model_config.get_diff_sampling_param())
        return time.perf_counter() - began

    def _build(self) -> None:
        """Build vLLM's AsyncLLM for this model into self._built, on a worker thread."""
        try:
            engine_args = _vllm("vllm.engine.arg_utils").AsyncEngineArgs
            platform = _vllm("vllm.platforms").current_platform
            async_llm = _vllm("vllm.v1.engine.async_llm").AsyncLLM
        except ImportError as error:
            raise EngineError(
                503,
                "model_unavailable",
                "The vLLM engine needs vLLM: pip install 'veil[vllm]'.",
            ) from error
        args = {
            "model": self._model,
            "max_model_len": self._max_model_len,
            "dtype": self._dtype,
            "disable_log_stats": True,
        } | self._extra_args
        if platform.is_cpu() and not MEMORY_ARGS & args.keys():
            args["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        # No local or return value here refers to the engine: something in vLLM's start keeps
        # this call's frames alive, and an engine held by one outlived aclose() until exit.
        try:
            self._built = async_llm.from_engine_args(engine_args(**args))
        except Exception as error:
            raise EngineError(
                503, "model_unavailable", f"vLLM could not start {self._model}: {error}"
            ) from error

    def _prompt(self, messages: list[ChatMessage]) -> list[int]:
        chat = [_template_message(m) for m in messages]
        try:
            text = self._tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=True
            )
        except Exception as error:  # templates refuse some message orders with raise_exception
            raise EngineError(
                400, "invalid_messages", f"The model's chat template refused the messages: {error}"
            ) from error
        # The template writes the special tokens (BOS included) itself.
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def _sampling(self, params: dict[str, Any], room: int) -> Any:
        sampling = _vllm("vllm.sampling_params")
        # The model's defaults (vLLM names), then what the client set.
        kwargs = {k: v for k, v in self._defaults.items() if k != "max_tokens"}
        for key, field in SAMPLING.items():
            if params.get(key) is not None:
                kwargs[field] = params[key]
        asked = (
            params.get("max_completion_tokens")
            or params.get("max_tokens")
            or self._defaults.get("max_tokens")
        )
        # Like vLLM's own server: without a limit, generate until the context is full.
        kwargs["max_tokens"] = min(int(asked), room) if asked else room
        stop = params.get("stop")
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if stops := [s for s in stops if s]:
            kwargs["stop"] = stops
        try:
            if (structured := _structured(params.get("response_format"))) is not None:
                kwargs["structured_outputs"] = structured
            return sampling.SamplingParams(output_kind=sampling.RequestOutputKind.DELTA, **kwargs)
        except Exception as error:  # vLLM checks ranges and combinations on construction
            raise EngineError(
                400, "invalid_value", f"vLLM refused the parameters: {error}"
            ) from error


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as Hugging Face chat templates take it (tool calls from another engine too)."""
    # Many chat templates know only system/user/assistant.
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": message.content}
    if message.tool_calls:
        # Templates that render calls expect the arguments as a mapping, as vLLM's server does.
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {
                    "name": call.function.name,
                    "arguments": _json_or_text(call.function.arguments),
                },
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _vllm(module: str) -> Any:
    """A vLLM module, imported on first use (vLLM is optional and has no type stubs here)."""
    return importlib.import_module(module)


def _check(params: dict[str, Any]) -> None:
    refuse_unsupported(params, "vLLM engine")
    response_format = params.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise EngineError(
                400,
                "unsupported_parameter",
                f"response_format type {kind!r} is not supported by the vLLM engine; "
                "use 'text', 'json_object' or 'json_schema'.",
            )
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise EngineError(
                    400,
                    "invalid_value",
                    "response_format.json_schema.schema must be a JSON object.",
                )


def _structured(response_format: Any) -> Any:
    """vLLM's structured-output constraint for an (already checked) response_format."""
    if response_format is None or response_format.get("type") == "text":
        return None
    constraint = _vllm("vllm.sampling_params").StructuredOutputsParams
    if response_format["type"] == "json_object":
        return constraint(json_object=True)
    return constraint(json=response_format["json_schema"]["schema"])


def _translate(error: Exception, name: str) -> EngineError:
    """An EngineError for what vLLM raised while generating."""
    if isinstance(error, EngineError):
        return error
    errors = _vllm("vllm.exceptions")
    if isinstance(error, errors.VLLMClientError):  # e.g. a JSON schema its grammar backend refuses
        return EngineError(400, "invalid_request", f"vLLM refused the request: {error}")
    if isinstance(error, errors.GracefulHTTPError):  # admission control: queue full
        status = int(error.http_status)
        return EngineError(status, "overloaded", error.message, retryable=status >= 500)
    if isinstance(error, _vllm("vllm.v1.engine.exceptions").EngineDeadError):
        return EngineError(503, "engine_dead", f"The vLLM engine {name!r} died: {error}")
    cause = error.__cause__ if error.__cause__ is not None else error
    if isinstance(cause, ValueError):  # vLLM validates some parameters only when adding
        return EngineError(400, "invalid_value", f"vLLM refused the request: {cause}")
    return EngineError(500, "engine_error", f"vLLM failed: {cause!r}")
