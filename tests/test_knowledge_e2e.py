"""The knowledge base through the whole path: `veil kb`, retrieval into the prompt with sources, the tool."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from config import ApiKey, Config, EngineConfig, ModelConfig, PipelineConfig
from eventstore.events import DocumentsRetrieved
from testkit.procs import run_veil
from testkit.upstreams import FakeOpenAI, ToolCalls
from tests.harness import VeilThread
from veil.natsserver import NatsServer

script: dict[str, Any] = {"reply": lambda body: "ok"}
ADMIN_KEY = "sk-kb-admin"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply=lambda body: script["reply"](body)) as fake:
        yield fake


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("docs")
    (folder / "returns.md").write_text(
        "# Returns\n\nItems may be returned within 30 days of delivery, with the receipt.\n\n"
        "# Shipping\n\nStandard shipping takes three to five working days.\n"
    )
    (folder / "warranty.html").write_text(
        "<html><head><script>var tracking = 'zz-script-text';</script></head><body>"
        "<h1>Warranty</h1><p>Every kettle carries a two-year warranty against defects.</p></body></html>"
    )
    return folder


@pytest.fixture(scope="module")
def veil(
    upstream: FakeOpenAI, docs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VeilThread]:
    with NatsServer(tmp_path_factory.mktemp("kb-nats")) as nats_server:
        added = run_veil(
            "kb",
            "add",
            "shop",
            str(docs),
            env={
                "VEIL_NATS_URL": nats_server.url,
                "VEIL_DATA_DIR": str(tmp_path_factory.mktemp("cli")),
            },
            timeout=120,
        )
        assert added.returncode == 0, added.stderr
        assert "2 added" in added.stdout
        config = Config(
            keys=[ApiKey(key=ADMIN_KEY, admin=True)],
            engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
            pipelines={
                "default": PipelineConfig(engine="up", model="m", knowledge=["shop"]),
                "agent": PipelineConfig(
                    engine="up",
                    model="m",
                    tools=["knowledge_search"],
                    knowledge=["shop"],
                    knowledge_k=0,
                ),
            },
            models=[
                ModelConfig(name="veil", pipeline="default"),
                ModelConfig(name="veil-agent", pipeline="agent"),
            ],
            nats_url=nats_server.url,
        )
        with VeilThread(config, nats_server.url) as server:
            yield server


def ask(veil: VeilThread, text: str, model: str = "veil") -> str:
    with openai.OpenAI(base_url=veil.base_url, api_key=ADMIN_KEY, max_retries=0) as client:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}]
        )
    return str(reply.model_extra["session_id"])


def test_the_chunk_with_the_answer_reaches_the_prompt_with_its_source(
    veil: VeilThread, upstream: FakeOpenAI, docs: Path
) -> None:
    script["reply"] = lambda body: "ok"
    sid = ask(veil, "How long do I have to send an item back?")
    system = upstream.last_request.body["messages"][0]["content"]
    assert "<documents>" in system and "cite it by its number" in system
    first = json.loads(system.split("[1] ", 1)[1].split("\n", 1)[0])
    assert first["source"] == "returns.md" and first["section"] == "Returns"
    assert "within 30 days" in first["text"]
    assert str(docs) not in system  # the server's folders stay on the server
    retrieved = next(e for e in veil.events(sid) if isinstance(e, DocumentsRetrieved))
    assert (
        retrieved.chunks[0].path == str(docs / "returns.md")
        and retrieved.chunks[0].similarity >= 0.3
    )
    assert "zz-script-text" not in str(upstream.requests)


def test_unrelated_questions_bring_no_documents(veil: VeilThread, upstream: FakeOpenAI) -> None:
    script["reply"] = lambda body: "ok"
    ask(veil, "Write me a limerick about a cat.")
    assert "<documents>" not in str(upstream.last_request.body["messages"][0])


def test_knowledge_search_tool(veil: VeilThread, upstream: FakeOpenAI, docs: Path) -> None:
    def tool_then_answer(body: dict[str, Any]) -> str | ToolCalls:
        answers = [m["content"] for m in body["messages"] if m["role"] == "tool"]
        return (
            f"Found: {answers[-1]}"
            if answers
            else ToolCalls([("knowledge_search", {"query": "kettle warranty length"})])
        )

    script["reply"] = tool_then_answer
    ask(veil, "How long is the kettle warranty?", model="veil-agent")
    tool_answer = upstream.last_request.body["messages"][-1]["content"]
    first = json.loads(tool_answer.split("\n", 1)[0].removeprefix("[1] "))
    assert first["source"] == "warranty.html" and "two-year warranty" in first["text"]
    assert str(docs) not in tool_answer


def test_removing_a_file_removes_it_from_retrieval(
    veil: VeilThread, upstream: FakeOpenAI, docs: Path, tmp_path: Path
) -> None:
    env = {"VEIL_NATS_URL": veil.nats_url, "VEIL_DATA_DIR": str(tmp_path)}
    again = run_veil("kb", "add", "shop", str(docs), env=env, timeout=120)
    assert "0 added, 0 updated, 2 unchanged" in again.stdout
    removed = run_veil("kb", "rm", "shop", str(docs / "warranty.html"), env=env, timeout=120)
    assert removed.returncode == 0 and "1 removed" in removed.stdout, (
        removed.stdout + removed.stderr
    )
    script["reply"] = lambda body: "ok"
    ask(veil, "How long is the kettle warranty?")
    assert "two-year warranty" not in str(upstream.last_request.body["messages"][0])
    listing = run_veil("kb", "ls", "shop", env=env).stdout
    assert "returns.md" in listing and "warranty.html" not in listing


def test_admin_endpoints_upload_list_and_delete(veil: VeilThread, upstream: FakeOpenAI) -> None:
    import urllib.error
    import urllib.request

    boundary = "veilboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="care.txt"\r\n'
        "Content-Type: text/plain\r\n\r\nDescale the kettle with citric acid every month.\r\n"
        f"--{boundary}--\r\n"
    ).encode()
    base = veil.base_url

    def call(
        method: str, path: str, data: bytes | None = None, content_type: str | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    status, added = call(
        "POST", "/knowledge/care/documents", body, f"multipart/form-data; boundary={boundary}"
    )
    assert status == 200 and len(added["data"]["added"]) == 1, added
    path = added["data"]["added"][0]
    status, listed = call("GET", "/knowledge/care/documents")
    assert [d["path"] for d in listed["data"]] == [path]
    status, collections = call("GET", "/knowledge")
    assert {c["name"] for c in collections["data"]} >= {"shop", "care"}
    assert call("DELETE", "/knowledge/care/documents?path=nope")[0] == 404
    assert call("DELETE", "/knowledge/bad.name/documents?path=x")[0] == 400
    from urllib.parse import quote

    assert call("DELETE", f"/knowledge/care/documents?path={quote(path)}")[0] == 200
    assert call("GET", "/knowledge/care/documents")[1]["data"] == []
