"""The gateway serving HTTPS itself (`--tls-cert`/`--tls-key`, `[server] tls_cert` and
`tls_key`, VEIL_TLS_CERT/VEIL_TLS_KEY), for deployments without a proxy in front: a real
`veil serve` with a certificate made here, the official SDK trusting only our CA."""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from testkit.procs import VeilProcess, run_veil
from testkit.upstreams import FakeOpenAI
from tests.test_cluster import Issued, issue, make_ca
from tests.test_processes import CLEAN, KEY

LISTENING = re.compile(r"Veil listening on (https?)://127\.0\.0\.1:(\d+)/v1")


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Issued]:
    where = tmp_path_factory.mktemp("gateway-tls")
    ca = make_ca(where / "ca", "Veil test CA")
    return ca.path, issue(ca, where / "gateway", "gateway", server=True)


def _env(data: Path, upstream: FakeOpenAI) -> dict[str, str]:
    return {
        **CLEAN,
        "VEIL_DATA_DIR": str(data),
        "VEIL_API_KEYS": KEY,
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": "x",
    }


def test_the_gateway_serves_https_to_clients_that_trust_its_ca(
    tmp_path: Path, upstream: FakeOpenAI, certs: tuple[Path, Issued]
) -> None:
    ca, gateway = certs
    args = ("serve", "--port", "0", "--tls-cert", str(gateway.cert), "--tls-key", str(gateway.key))
    with VeilProcess(*args, env=_env(tmp_path / "data", upstream)) as veil:
        found = veil.wait_for(LISTENING, timeout=120)
        assert found.group(1) == "https"
        port = int(found.group(2))
        base = f"https://127.0.0.1:{port}/v1"
        with (
            openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(ca))) as http,
            openai.OpenAI(base_url=base, api_key=KEY, http_client=http, max_retries=0) as client,
        ):
            reply = client.chat.completions.create(
                model="veil", messages=[{"role": "user", "content": "over TLS"}]
            )
            assert reply.choices[0].message.content == "echo: over TLS"
            stream = client.chat.completions.create(
                model="veil", messages=[{"role": "user", "content": "streamed"}], stream=True
            )
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text == "echo: streamed"

        # A client that does not trust our CA refuses the server.
        with (
            openai.DefaultHttpxClient() as untrusting,
            openai.OpenAI(
                base_url=base, api_key=KEY, http_client=untrusting, max_retries=0
            ) as client,
            pytest.raises(openai.APIConnectionError),
        ):
            client.models.list()

        # Plain HTTP on the HTTPS port gets no HTTP answer.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = raw.recv(1024)
        assert not answer.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--tls-cert", "{cert}"], "needs both a certificate"),
        (["--tls-key", "{key}"], "needs both a certificate"),
        (["--tls-cert", "{missing}", "--tls-key", "{key}"], "cannot read"),
        (["--tls-cert", "{key}", "--tls-key", "{key}"], "not a PEM certificate and its key"),
        (["--tls-cert", "{cert}", "--tls-key", "{other_key}"], "not a PEM certificate"),
    ],
)
def test_bad_tls_files_are_refused_with_a_clear_message(
    tmp_path: Path,
    upstream: FakeOpenAI,
    certs: tuple[Path, Issued],
    flags: list[str],
    says: str,
) -> None:
    _, gateway = certs
    other = issue(make_ca(tmp_path / "ca2", "Other CA"), tmp_path / "other", "x", server=True)
    names = {
        "cert": str(gateway.cert),
        "key": str(gateway.key),
        "missing": str(tmp_path / "nope.pem"),
        "other_key": str(other.key),
    }
    argv = ["serve", "--port", "0", *(f.format(**names) for f in flags)]
    done = run_veil(*argv, env=_env(tmp_path / "data", upstream))
    assert done.returncode == 2
    assert says in done.stderr


def test_the_config_file_names_the_files_too(
    tmp_path: Path, upstream: FakeOpenAI, certs: tuple[Path, Issued]
) -> None:
    _, gateway = certs
    config = tmp_path / "veil.toml"
    config.write_text(f'[server]\ntls_cert = "{gateway.cert}"\n')
    done = run_veil("--config", str(config), "serve", env=_env(tmp_path / "data", upstream))
    assert done.returncode == 2
    assert "server.tls_cert" in done.stderr and "tls_key" in done.stderr


def test_a_client_that_never_finishes_its_handshake_is_cut_off(
    tmp_path: Path, upstream: FakeOpenAI, certs: tuple[Path, Issued]
) -> None:
    # The connection guard sees a TLS connection only after its handshake: the handshake
    # gets the headers' time (here 1 s), not asyncio's default of 60 s.
    _, gateway = certs
    config = tmp_path / "veil.toml"
    config.write_text(
        f'[server]\nheader_timeout = 1\ntls_cert = "{gateway.cert}"\ntls_key = "{gateway.key}"\n'
    )
    env = _env(tmp_path / "data", upstream)
    with VeilProcess("--config", str(config), "serve", "--port", "0", env=env) as veil:
        port = int(veil.wait_for(LISTENING, timeout=120).group(2))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:
            try:
                closed = silent.recv(1) == b""
            except ConnectionResetError:
                closed = True
        assert closed, "the server kept a connection that never began its handshake"
