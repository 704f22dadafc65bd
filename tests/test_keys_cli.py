"""`veil keys` against a server that has no keys yet: its own nats-server, so its own,
empty key store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.procs import run_veil
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread
from tests.test_keys import _config, chat, eventually


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def test_the_first_managed_key_ends_anonymous_access(
    nats_url: str, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    config = _config(nats_url, upstream, [])
    config.data_dir = str(tmp_path)
    env = {"VEIL_NATS_URL": nats_url}
    with VeilThread(config, nats_url) as server:
        assert chat(server, "anything") == 200  # no keys: loopback only, anonymous
        made = run_veil("keys", "create", "--tenant", "acme", "--name", "ci", env=env)
        assert made.returncode == 0, made.stderr
        secret = made.stdout.strip().splitlines()[-1]
        assert secret.startswith("sk-veil-")
        eventually(lambda: chat(server, "anything") == 401)
        assert chat(server, secret) == 200
        listed = run_veil("keys", "ls", env=env)
        assert "acme" in listed.stdout and secret not in listed.stdout
        key_id = listed.stdout.splitlines()[1].split()[0]
        rotated = run_veil("keys", "rotate", key_id, env=env)
        new_secret = rotated.stdout.strip().splitlines()[-1]
        eventually(lambda: chat(server, secret) == 401)
        assert chat(server, new_secret) == 200
        assert run_veil("keys", "revoke", key_id, env=env).returncode == 0
        eventually(lambda: chat(server, new_secret) == 401)
        assert run_veil("keys", "revoke", "key_nope", env=env).returncode == 1
