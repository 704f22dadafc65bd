"""Veil's configuration: the schema (config/schema.py) and its loading (config/loader.py).

A leaf of the package graph: it imports no actor and no gateway, so every role can
read it without loading what it does not run.
"""

from config.loader import (
    LOCAL_MODEL,
    ConfigError,
    load_config,
    local_install_command,
    local_model_available,
)
from config.schema import (
    DEFAULT_MODEL,
    DEFAULT_THRESHOLD,
    HISTORY_SHARE,
    UNSUPPORTED_BY_KIND,
    ApiKey,
    Config,
    EngineConfig,
    FallbackConfig,
    GenerationDefaults,
    InvalidRoutingRule,
    JwtConfig,
    MemoryConfig,
    MemoryPolicy,
    ModelConfig,
    PipelineConfig,
    RouterConfig,
    RoutingRules,
    ServerConfig,
    ToolConfig,
    key_id,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_THRESHOLD",
    "HISTORY_SHARE",
    "LOCAL_MODEL",
    "UNSUPPORTED_BY_KIND",
    "ApiKey",
    "Config",
    "ConfigError",
    "EngineConfig",
    "FallbackConfig",
    "GenerationDefaults",
    "InvalidRoutingRule",
    "JwtConfig",
    "MemoryConfig",
    "MemoryPolicy",
    "ModelConfig",
    "PipelineConfig",
    "RouterConfig",
    "RoutingRules",
    "ServerConfig",
    "ToolConfig",
    "key_id",
    "load_config",
    "local_install_command",
    "local_model_available",
]
