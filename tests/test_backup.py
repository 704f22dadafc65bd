"""`veil backup` and `veil restore` as an operator runs them: a live `veil serve` backed up,
its data restored into a new directory, and a server started there that answers as the
first did (sessions, the deleted one, a managed key, memory and knowledge rebuilt, the
replay); a stopped data directory backed up; every refusal."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import openai
import pytest

from testkit.procs import VeilProcess, processes_mentioning, run_veil
from testkit.upstreams import FakeOpenAI
from tests.test_processes import CLEAN
from veil.natsserver import NatsServer

ADMIN = "sk-backup-admin"
PATIENCE = 60

CONFIG = """
[[keys]]
key = "{admin}"
tenant = "acme"
admin = true

[engines.up]
kind = "openai"
base_url = "{base_url}"
api_key = "x"
timeout = 20

[pipelines.default]
engine = "up"
model = "m"
retries = 0
knowledge = ["handbook"]

[[models]]
name = "veil"
pipeline = "default"
"""

HANDBOOK = (
    "# Launch procedure\n\nThe launch code word is marmalade; say it twice to the duty officer "
    "before the rocket leaves the pad.\n"
)


@dataclass(frozen=True)
class Origin:
    """The first server's data, its backup, and what it answered before it stopped."""

    root: Path
    data: Path
    backup: Path
    config: Path
    kept: list[str]
    deleted: str
    heron: str
    messages: dict[str, Any]
    replay: str
    managed_key: str

    def env(self, data: Path) -> dict[str, str]:
        return {**CLEAN, "VEIL_DATA_DIR": str(data), "VEIL_CONFIG": str(self.config)}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _serve(env: dict[str, str]) -> tuple[VeilProcess, str]:
    serve = VeilProcess("serve", "--port", "0", env=env)
    port = serve.wait_for(r"Veil listening on http://127\.0\.0\.1:(\d+)/v1", 120).group(1)
    return serve, f"http://127.0.0.1:{port}/v1"


def _chat(base: str, text: str, sid: str | None = None, key: str = ADMIN) -> str:
    with openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=PATIENCE) as client:
        reply = client.chat.completions.create(
            model="veil",
            messages=[{"role": "user", "content": text}],
            extra_body={"session_id": sid} if sid else None,
        )
    assert reply.model_extra is not None
    return str(reply.model_extra["session_id"])


def _call(method: str, url: str) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {ADMIN}"}, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=PATIENCE) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _get(base: str, path: str) -> tuple[int, Any]:
    return _call("GET", base + path)


def _eventually(check: Callable[[], bool], what: str) -> None:
    pause = threading.Event()
    for _ in range(PATIENCE * 10):
        if check():
            return
        pause.wait(0.1)
    raise AssertionError(f"gave up waiting for {what}")


def _ok(*args: str, env: dict[str, str]) -> str:
    done = run_veil(*args, env=env, timeout=180)
    assert done.returncode == 0, f"veil {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


def _refused(*args: str, env: dict[str, str]) -> str:
    done = run_veil(*args, env=env, timeout=180)
    assert done.returncode == 1, f"veil {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stderr


def _loose_modes(root: Path) -> list[str]:
    return [
        f"{path} {stat.filemode(path.stat().st_mode)}"
        for path in [root, *root.rglob("*")]
        if path.stat().st_mode & 0o077
    ]


def _manifest(backup: Path) -> dict[str, Any]:
    return dict(json.loads((backup / "manifest.json").read_text()))


def _streams(manifest: dict[str, Any]) -> dict[str, tuple[int, int]]:
    return {s["name"]: (s["messages"], s["last_seq"]) for s in manifest["streams"]}


@pytest.fixture(scope="module")
def origin(upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Origin:
    root = tmp_path_factory.mktemp("backup")
    config = root / "veil.toml"
    config.write_text(CONFIG.format(admin=ADMIN, base_url=upstream.base_url))
    (root / "handbook.md").write_text(HANDBOOK)
    data, backup = root / "origin", root / "backup"
    env = {**CLEAN, "VEIL_DATA_DIR": str(data), "VEIL_CONFIG": str(config)}
    serve, base = _serve(env)
    try:
        heron = _chat(base, "My favourite bird is the grey heron.")
        _chat(base, "And my favourite colour is teal.", heron)
        other = _chat(base, "Plan a weekend in Lisbon for me.")
        deleted = _chat(base, "Forget this: the vault password is swordfish.")
        assert _call("DELETE", f"{base}/sessions/{deleted}")[0] == 200
        managed_key = _ok("keys", "create", "--tenant", "acme", "--name", "ci", env=env)
        managed_key = managed_key.strip().splitlines()[-1]
        assert managed_key.startswith("sk-veil-")
        keyed = _chat(base, "Hello from the CI key.", key=managed_key)
        assert "1 added" in _ok("kb", "add", "handbook", str(root / "handbook.md"), env=env)
        messages = {sid: _get(base, f"/sessions/{sid}/messages") for sid in (heron, other, keyed)}
        assert all(status == 200 for status, _ in messages.values()), messages
        replay = _ok("replay", heron, env=env)
        assert "grey heron" in replay

        printed = _ok("backup", str(backup), env=env)
        assert "CHAT_EVENTS" in printed and "left out: KV_VEIL_LIMITS" in printed
        # The server runs on this directory: restoring into it is refused, whatever the flag.
        assert "stop it first" in _refused("restore", "--force", str(backup), env=env)
    finally:
        assert serve.interrupt() == 0, serve.lines
    return Origin(
        root=root,
        data=data,
        backup=backup,
        config=config,
        kept=[heron, other, keyed],
        deleted=deleted,
        heron=heron,
        messages={sid: body for sid, (_, body) in messages.items()},
        replay=replay,
        managed_key=managed_key,
    )


def test_the_backup_is_every_veil_stream_but_the_limits_and_owner_only(origin: Origin) -> None:
    manifest = _manifest(origin.backup)
    assert manifest["veil_version"] and manifest["nats_server"]
    assert set(_streams(manifest)) == {
        "CHAT_EVENTS",
        "CHAT_TOMBSTONES",
        "KB_EVENTS",
        "KV_VEIL_KEYS",
    }
    assert list(manifest["left_out"]) == ["KV_VEIL_LIMITS"]
    files = sorted(p.name for p in origin.backup.iterdir())
    assert files == sorted(["manifest.json", *(s["file"] for s in manifest["streams"])])
    for entry in manifest["streams"]:
        assert (origin.backup / entry["file"]).stat().st_size == entry["bytes"]
        assert entry["config"]["name"] == entry["name"] and entry["messages"] >= 1
    assert _streams(manifest)["CHAT_TOMBSTONES"][0] == 1
    assert _loose_modes(origin.backup) == []


def test_a_restored_directory_answers_as_the_original(
    origin: Origin, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    data = tmp_path / "restored"
    env = origin.env(data)
    printed = _ok("restore", str(origin.backup), env=env)
    assert "Restored 4 streams" in printed
    # The projections are not in a backup: none here, so each rebuilds from the log.
    for name in ("memory.sqlite", "knowledge.sqlite", "usage.db"):
        assert not (data / name).exists()
    assert _ok("replay", origin.heron, env=env) == origin.replay
    assert "no events" in _refused("replay", origin.deleted, env=env)
    serve, base = _serve(env)
    try:
        for sid in origin.kept:
            assert _get(base, f"/sessions/{sid}/messages") == (200, origin.messages[sid])
        assert _get(base, f"/sessions/{origin.deleted}/messages")[0] == 404
        # Memory: the index was rebuilt from the restored log.
        _eventually(
            lambda: any(
                "grey heron" in hit["content"]
                for hit in _get(base, f"/sessions/{origin.heron}/memories?q=heron")[1]["data"]
            ),
            "the rebuilt memory index to find the heron",
        )
        # Usage: the ledger counted the log again, the erased session's turn not at all.
        today = datetime.now(UTC).date()
        since, until = today - timedelta(days=1), today + timedelta(days=1)

        def requests() -> int:
            status, body = _get(base, f"/usage?from={since}&to={until}")
            assert status == 200, body
            return sum(r["num_model_requests"] for b in body["data"] for r in b["results"])

        _eventually(lambda: requests() == 4, "the rebuilt ledger to count the 4 turns kept")
        # The managed key still opens the door.
        _chat(base, "Still there?", key=origin.managed_key)
        # Knowledge: the collection is searched from the rebuilt index.
        upstream.reset()
        _chat(base, "What is the launch code word?")
        assert "marmalade" in json.dumps(upstream.last_request.body["messages"])
    finally:
        assert serve.interrupt() == 0, serve.lines
    assert _ok("replay", origin.heron, env=env) == origin.replay


def test_a_stopped_data_directory_is_backed_up_the_same(origin: Origin, tmp_path: Path) -> None:
    env = origin.env(origin.data)
    before = sorted(p.name for p in origin.backup.iterdir())
    assert "not empty" in _refused("backup", str(origin.backup), env=env)
    assert sorted(p.name for p in origin.backup.iterdir()) == before
    again = tmp_path / "again"
    _ok("backup", str(again), env=env)
    assert _streams(_manifest(again)) == _streams(_manifest(origin.backup))
    assert not processes_mentioning(str(origin.data / "nats")), "its nats-server stopped"
    assert not (origin.data / "nats.url").exists()
    assert _loose_modes(again) == []


def test_a_restore_refuses_streams_that_exist_unless_forced(origin: Origin, tmp_path: Path) -> None:
    data = tmp_path / "target"
    env = origin.env(data)
    _ok("restore", str(origin.backup), env=env)
    _ok("keys", "create", "--tenant", "acme", "--name", "after-the-backup", env=env)
    refusal = _refused("restore", str(origin.backup), env=env)
    assert "CHAT_EVENTS" in refusal and "KV_VEIL_KEYS" in refusal and "--force" in refusal
    assert _key_names(env) == {"ci", "after-the-backup"}
    # Snapshots of the log being replaced would name its sequence numbers, which the
    # restored log gives out again: the bucket goes with the log.
    with NatsServer(data / "nats") as server:
        asyncio.run(_make_snapshot_bucket(server.url))
    replaced = _ok("restore", "--force", str(origin.backup), env=env)
    assert "Replaced: CHAT_EVENTS" in replaced and "KV_VEIL_SNAPSHOTS" in replaced
    assert _key_names(env) == {"ci"}
    with NatsServer(data / "nats") as server:
        assert not asyncio.run(_has_stream(server.url, "KV_VEIL_SNAPSHOTS"))


async def _make_snapshot_bucket(url: str) -> None:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().create_key_value(bucket="VEIL_SNAPSHOTS")
        await kv.put("acme.old", b"a snapshot of another log")
    finally:
        await nc.close()


async def _has_stream(url: str, name: str) -> bool:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().stream_info(name)
        return True
    except nats.js.errors.NotFoundError:
        return False
    finally:
        await nc.close()


def _key_names(env: dict[str, str]) -> set[str]:
    return {json.loads(line)["name"] for line in _ok("keys", "ls", "--json", env=env).splitlines()}


def test_a_restore_refuses_a_directory_with_indexes_of_another_log(
    origin: Origin, tmp_path: Path
) -> None:
    data = tmp_path / "stale"
    data.mkdir()
    (data / "usage.db").write_bytes(b"rows of another log")
    assert "usage.db" in _refused("restore", str(origin.backup), env=origin.env(data))
    assert not (data / "nats").exists(), "refused before any nats-server started"


def _flip_a_byte(backup: Path) -> None:
    path = backup / "CHAT_EVENTS.snapshot"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _cut_short(backup: Path) -> None:
    path = backup / "CHAT_EVENTS.snapshot"
    path.write_bytes(path.read_bytes()[:-1])


def _miscount_chunks(backup: Path) -> None:
    manifest = _manifest(backup)
    manifest["streams"][0]["chunks"] += 1
    (backup / "manifest.json").write_text(json.dumps(manifest))


def _no_manifest(backup: Path) -> None:
    (backup / "manifest.json").unlink()


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (_flip_a_byte, "SHA-256"),
        (_cut_short, "bytes, the manifest says"),
        (_miscount_chunks, "chunks"),
        (_no_manifest, "not a Veil backup"),
    ],
)
def test_a_damaged_backup_is_refused_before_anything_is_restored(
    origin: Origin, tmp_path: Path, damage: Callable[[Path], None], said: str
) -> None:
    backup = tmp_path / "damaged"
    shutil.copytree(origin.backup, backup)
    damage(backup)
    data = tmp_path / "data"
    assert said in _refused("restore", str(backup), env=origin.env(data))
    assert not data.exists()
