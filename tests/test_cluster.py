"""Veil on a 3-node NATS cluster as cluster/cluster.conf sets it up (issue 16): three real
nats-servers from the wheel on loopback, mutual TLS for clients and routes with
certificates made here, a user per role; a worker and a gateway as processes."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import secrets
import ssl
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import nats
import nats.errors
import nats.js.errors
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nats.aio.client import Client

from bus.connection import replicas
from bus.subjects import EVENTS_STREAM, KB_STREAM, TOMBSTONES_STREAM, session_events
from eventstore.jetstream import ensure_stream
from testkit.cluster import free_ports
from testkit.procs import REPO, Child, VeilProcess
from testkit.upstreams import FakeOpenAI

CLUSTER_CONF = REPO / "cluster" / "cluster.conf"
KEY = "sk-cluster-test"
# Everything Veil keeps in JetStream: each must be on all three nodes.
REPLICATED = [
    EVENTS_STREAM,
    TOMBSTONES_STREAM,
    KB_STREAM,
    "KV_VEIL_KEYS",
    "KV_VEIL_LIMITS",
    "KV_VEIL_HISTORIES",
]
CLEAN = {
    name: ""
    for name in (
        "VEIL_NATS_URL",
        "VEIL_CONFIG",
        "VEIL_API_KEYS",
        "VEIL_UPSTREAM_MODEL",
        "OPENAI_BASE_URL",
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
    )
}


# --- certificates -----------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    path: Path


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    path.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = path / "cert.pem", path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Issued(cert_file, key_file)


def _builder(
    subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_ca(where: Path, name: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key, _write(where, cert, key).cert)


def issue(ca: Authority, where: Path, name: str, *, server: bool) -> Issued:
    """A certificate for 127.0.0.1 and localhost (a node: server and route client), or a
    client's."""
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + (
        [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    )
    builder = (
        _builder(name, ca.cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return _write(where, builder.sign(ca.key, hashes.SHA256()), key)


# --- the cluster ------------------------------------------------------------------------


def nats_binary() -> str:
    return str(Path(sys.executable).parent / "nats-server")


@dataclass
class Cluster:
    ca: Authority
    client: Issued
    passwords: dict[str, str]
    client_ports: list[int]
    route_ports: list[int]
    nodes: list[Child]
    node_env: dict[str, str]

    def urls(self, user: str, scheme: str = "tls") -> list[str]:
        return [
            f"{scheme}://{user}:{self.passwords[user]}@127.0.0.1:{p}" for p in self.client_ports
        ]

    def tls(self, *, cert: Issued | None = None, ca: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(ca or self.ca.path))
        chosen = cert or self.client
        context.load_cert_chain(str(chosen.cert), str(chosen.key))
        return context

    def role_env(self, user: str) -> dict[str, str]:
        """What a Veil process of this role is given to reach the cluster."""
        return {
            "VEIL_NATS_URL": ",".join(self.urls(user)),
            "VEIL_NATS_CA": str(self.ca.path),
            "VEIL_NATS_CERT": str(self.client.cert),
            "VEIL_NATS_KEY": str(self.client.key),
            "VEIL_NATS_REPLICAS": "3",
        }

    async def admin(self) -> Client:
        return await nats.connect(self.urls("admin"), tls=self.tls(), connect_timeout=5)


async def _wait_for_jetstream(cluster: Cluster) -> None:
    """Until the nodes have elected a JetStream meta leader (account info answers)."""
    nc = await cluster.admin()
    try:
        js = nc.jetstream()
        for _ in range(200):
            try:
                await js.account_info()
                return
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.Error):
                await asyncio.sleep(0.1)
        raise AssertionError("the cluster elected no JetStream leader")
    finally:
        await nc.close()


def start_node(
    name: str, port: int, route_port: int, routes: list[int], where: Path, env: dict[str, str]
) -> Child:
    """A node running cluster/cluster.conf as compose.yaml runs it, on loopback."""
    return Child(
        [
            nats_binary(),
            "-c",
            str(CLUSTER_CONF),
            "-n",
            name,
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "-sd",
            str(where / name),
            "--cluster",
            f"nats://127.0.0.1:{route_port}",
            "--routes",
            ",".join(f"nats://127.0.0.1:{p}" for p in routes),
        ],
        name=name,
        env=env,
    )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    ca = make_ca(tmp_path / "ca", "Veil test CA")
    node_cert = issue(ca, tmp_path / "node", "nats-node", server=True)
    client = issue(ca, tmp_path / "client", "veil-client", server=False)
    # Not starting with a digit: the server reads an environment value as a config value.
    passwords = {user: f"pw-{secrets.token_hex(8)}" for user in ("admin", "gateway", "worker")}
    env = {
        **os.environ,
        "NATS_CA_FILE": str(ca.path),
        "NATS_CERT_FILE": str(node_cert.cert),
        "NATS_KEY_FILE": str(node_cert.key),
        **{f"NATS_{user.upper()}_PASSWORD": pw for user, pw in passwords.items()},
    }
    ports = free_ports(6)
    client_ports, route_ports = ports[:3], ports[3:]
    nodes: list[Child] = []
    try:
        for i in range(3):
            others = [p for j, p in enumerate(route_ports) if j != i]
            nodes.append(
                start_node(f"nats-{i + 1}", client_ports[i], route_ports[i], others, tmp_path, env)
            )
        for node in nodes:
            node.wait_for("Server is ready")
        found = Cluster(ca, client, passwords, client_ports, route_ports, nodes, env)
        asyncio.run(_wait_for_jetstream(found))
        yield found
    finally:
        for node in nodes:
            node.stop()


# --- Veil on it -------------------------------------------------------------------------


def _config(tmp_path: Path, upstream: FakeOpenAI) -> Path:
    config = tmp_path / "veil.toml"
    config.write_text(
        f"""
[[keys]]
key = "{KEY}"
tenant = "acme"

[engines.up]
kind = "openai"
base_url = "{upstream.base_url}"
api_key = "x"
timeout = 10

[pipelines.default]
engine = "up"
model = "up-model"

[[models]]
name = "veil"
pipeline = "default"
"""
    )
    return config


def _chat(base_url: str, text: str, session_id: str | None = None) -> str:
    with openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=30) as client:
        extra = {"session_id": session_id} if session_id else None
        reply = client.chat.completions.create(
            model="veil", messages=[{"role": "user", "content": text}], extra_body=extra
        )
        assert reply.choices[0].message.content == f"echo: {text}"
        sid = (reply.model_extra or {})["session_id"]
        assert isinstance(sid, str)
        return sid


async def _replicas(cluster: Cluster) -> dict[str, tuple[int, int]]:
    """Per stream: its configured replicas, and the nodes that hold it (leader and peers)."""
    nc = await cluster.admin()
    try:
        js = nc.jetstream()
        found = {}
        for name in REPLICATED:
            info = await js.stream_info(name)
            assert info.cluster is not None
            held = 1 + len(info.cluster.replicas or [])
            found[name] = (info.config.num_replicas or 0, held)
        return found
    finally:
        await nc.close()


async def _events_leader(cluster: Cluster) -> str:
    nc = await cluster.admin()
    try:
        info = await nc.jetstream().stream_info(EVENTS_STREAM)
        assert info.cluster is not None and info.cluster.leader is not None
        return info.cluster.leader
    finally:
        await nc.close()


def test_turns_on_the_cluster_are_kept_on_three_nodes_and_survive_one(
    tmp_path: Path, cluster: Cluster
) -> None:
    with FakeOpenAI() as upstream:
        common = {
            **CLEAN,
            "VEIL_CONFIG": str(_config(tmp_path, upstream)),
            "VEIL_DATA_DIR": str(tmp_path / "veil"),
        }
        worker = VeilProcess("worker", env={**common, **cluster.role_env("worker")})
        gateway = VeilProcess(
            "gateway", "--port", "0", env={**common, **cluster.role_env("gateway")}
        )
        try:
            worker.wait_for("Workers ready", timeout=60)
            port = gateway.wait_for(r"Veil listening on http://127\.0\.0\.1:(\d+)/v1", 60).group(1)
            base = f"http://127.0.0.1:{port}/v1"
            sid = _chat(base, "hello cluster")
            # The gateway's other doors under its permissions: the Anthropic door (the
            # histories bucket), a session read, the usage service.
            with anthropic.Anthropic(
                base_url=base.removesuffix("/v1"), api_key=KEY, max_retries=0, timeout=30
            ) as claude:
                message = claude.messages.create(
                    model="veil", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
                )
                assert message.content[0].type == "text" and message.content[0].text == "echo: hi"
            headers = {"Authorization": f"Bearer {KEY}"}
            for path in (f"/sessions/{sid}/messages", "/usage"):
                request = urllib.request.Request(base + path, headers=headers)
                with urllib.request.urlopen(request, timeout=30) as answer:  # raises on 4xx/5xx
                    assert answer.status == 200, path

            assert asyncio.run(_replicas(cluster)) == {name: (3, 3) for name in REPLICATED}

            # The node leading the log goes away: the others elect a leader, the processes
            # move over, and the session goes on with its history.
            leader = asyncio.run(_events_leader(cluster))
            cluster.nodes[int(leader.removeprefix("nats-")) - 1].kill()
            for attempt in range(60):
                try:
                    _chat(base, "still there?", sid)
                    break
                except openai.APIStatusError as e:
                    # While the survivors elect a leader and the processes reconnect, the
                    # log is unavailable: 503, or 500 when the session actor's load failed.
                    assert e.status_code in (500, 503), e
                    if attempt == 59:
                        raise
                    asyncio.run(asyncio.sleep(0.5))
            assert [m["content"] for m in upstream.last_request.body["messages"]] == [
                "hello cluster",
                "echo: hello cluster",
                "still there?",
            ]
            assert asyncio.run(_events_leader(cluster)) != leader
        finally:
            codes = [gateway.stop(), worker.stop()]
        assert codes == [0, 0], gateway.lines + worker.lines
        refused = [
            line for line in gateway.lines + worker.lines if "permissions violation" in line.lower()
        ]
        assert not refused, "a role lacks a permission it uses:\n" + "\n".join(refused)


async def _publish_as(cluster: Cluster, user: str, subject: str) -> list[Exception]:
    """Publish to subject with this user's credentials; the errors the server sent back."""
    errors: list[Exception] = []

    async def on_error(error: Exception) -> None:
        errors.append(error)

    nc = await nats.connect(cluster.urls(user), tls=cluster.tls(), error_cb=on_error)
    try:
        await nc.publish(subject, b"{}")
        await nc.flush()
        # A violation comes back as -ERR, after the PONG of our flush at the latest; a
        # second round trip makes sure it has been read.
        await nc.flush()
        with_violation = [e for e in errors if "permissions violation" in str(e).lower()]
        return with_violation
    finally:
        await nc.close()


def test_only_workers_append_to_the_log(cluster: Cluster) -> None:
    async def scenario() -> None:
        admin = await cluster.admin()
        try:
            await ensure_stream(admin.jetstream(), replicas=3)
            # A process started without VEIL_NATS_REPLICAS leaves the stream's copies alone.
            kept = await ensure_stream(admin.jetstream(), replicas=1)
            assert kept.config.num_replicas == 3
            subject = session_events("acme", "s1")
            denied = await _publish_as(cluster, "gateway", subject)
            assert denied and subject in str(denied[0]), denied
            # The gateway's own subjects pass; a worker may append.
            assert await _publish_as(cluster, "gateway", "chat.session.acme.s1.cmd") == []
            assert await _publish_as(cluster, "worker", subject) == []
            info = await admin.jetstream().stream_info(EVENTS_STREAM)
            assert info.state.messages == 1, "only the worker's message is in the log"
        finally:
            await admin.close()

    asyncio.run(scenario())


async def _connects(url: str, tls: ssl.SSLContext | None) -> bool:
    try:
        nc = await nats.connect(
            url, tls=tls, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5
        )
    except (TimeoutError, OSError, nats.errors.Error):
        return False
    try:
        await nc.flush(timeout=5)
        return True
    except (TimeoutError, OSError, nats.errors.Error):
        return False
    finally:
        await nc.close()


def test_only_clients_with_a_certificate_from_our_ca_connect(
    tmp_path: Path, cluster: Cluster
) -> None:
    rogue_ca = make_ca(tmp_path / "rogue-ca", "Someone else's CA")
    rogue = issue(rogue_ca, tmp_path / "rogue", "veil-client", server=False)
    url = cluster.urls("gateway")[0]
    trust_only = ssl.create_default_context(cafile=str(cluster.ca.path))

    async def scenario() -> list[bool]:
        return [
            await _connects(url, cluster.tls()),
            await _connects(url, trust_only),
            await _connects(url, cluster.tls(cert=rogue)),
            await _connects(url.replace("tls://", "nats://"), None),
        ]

    assert asyncio.run(scenario()) == [True, False, False, False]


def test_the_replica_count_comes_from_the_environment() -> None:
    assert replicas({}) == 1, "the embedded server keeps one copy"
    assert replicas({"VEIL_NATS_REPLICAS": "3"}) == 3
    for wrong in ("0", "6", "three", "-1"):
        with pytest.raises(ValueError, match="VEIL_NATS_REPLICAS"):
            replicas({"VEIL_NATS_REPLICAS": wrong})


def test_a_node_without_a_certificate_from_our_ca_joins_no_route(
    tmp_path: Path, cluster: Cluster
) -> None:
    rogue_ca = make_ca(tmp_path / "rogue-ca", "Someone else's CA")
    rogue_cert = issue(rogue_ca, tmp_path / "rogue", "nats-rogue", server=True)
    # It trusts our CA (so it would accept our nodes): only our nodes' check can stop it.
    env = {**cluster.node_env, "NATS_CERT_FILE": str(rogue_cert.cert)}
    env["NATS_KEY_FILE"] = str(rogue_cert.key)
    port, route_port = free_ports(2)
    with start_node("nats-rogue", port, route_port, cluster.route_ports[:1], tmp_path, env):
        # Go's TLS sends no certificate the node's CA did not sign: refused for want of one.
        cluster.nodes[0].wait_for("TLS route handshake error")
