"""The knowledge base end to end: real files, real NATS, real SQLite, the real embedder."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Iterator, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pysqlite3.dbapi2 as sqlite  # type: ignore[import-untyped]
import pytest
import structlog
from nats.aio.client import Client

from actors.knowledge import KnowledgeIndex, ingest, remove
from actors.knowledge.chunk import chunk_sections
from actors.knowledge.index import collection_scope
from actors.knowledge.ingest import collections
from actors.knowledge.log import KnowledgeLog
from actors.knowledge.parse import parse, parse_html, parse_markdown
from eventstore.knowledge import ChunkData, DocumentAdded, DocumentRemoved, KbEvent, Position
from testkit.pdf import write_pdf
from tests.actors.test_memory_actor import HeldEmbedder

BREAD = """# Sourdough at home

A guide to the bakery's house loaf.

## Starter

Feed the starter twice a day with equal weights of rye flour and water. It is ready
when it doubles within six hours and smells of yoghurt rather than acetone.

## Baking

Bake the loaf in a cast iron pot at 250 degrees Celsius for 20 minutes with the lid on,
then 25 minutes with the lid off, until the crust is deep brown.

## Storage

Keep the bread cut side down on a wooden board; never store it in the fridge, where
the crumb goes stale three times faster.
"""

BIKE = """# Bicycle maintenance

## Chain

Clean and oil the chain every 300 kilometres. A chain stretched beyond 0.75 percent
must be replaced, or it will wear out the cassette.

## Tyres

Road tyres of 28 millimetres run best at 5.5 bar for a rider of 75 kilograms; go lower
in the rain for more grip.

## Brakes

Replace disc brake pads when the friction material is thinner than 1 millimetre.
"""

HTML = """<!doctype html><html><head><title>Office handbook</title>
<style>.banner { color: papayawhip; }</style>
<script>var trackingSecret = "zanzibarquokka"; function f() { return 1; }</script></head>
<body><nav>Home | About</nav>
<h1>Office handbook</h1>
<h2>Wi-Fi</h2><p>The guest Wi-Fi network is <b>Lighthouse-Guest</b> and its password is
written on the whiteboard in room 4.12.</p>
<h2>Parking</h2><p>Visitors park on level minus two; the barrier opens with the code 7731.</p>
<script>console.log("zanzibarquokka")</script>
<h2>Lunch</h2><p>The canteen serves lunch from 11:30 to 14:00, vegetarian on Thursdays.</p>
</body></html>"""

NOTES = """Meeting notes, 3 March.

The quarterly review moved to the 14th of April, in the large boardroom.

Budget: the marketing team gets 40,000 euros for the spring campaign.
"""

PDF_PAGES = [
    [
        "Volcano field guide",
        "",
        "Mount Etna is the most active volcano in Europe.",
        "Its summit is about 3,357 metres above sea level.",
    ],
    [
        "Safety",
        "",
        "Hikers above 2,900 metres must be accompanied by an authorised guide.",
        "Carry a helmet: lava bombs can land far from the craters.",
    ],
]

QUESTIONS = [
    ("how long should the loaf bake with the lid off", "bread.md", "25 minutes"),
    ("when is my sourdough starter ready to use", "bread.md", "doubles"),
    ("what tyre pressure for road bike tyres", "bike.md", "5.5 bar"),
    ("when do I need a new chain", "bike.md", "0.75 percent"),
    ("what is the password of the guest wifi", "handbook.html", "Lighthouse-Guest"),
    ("where can visitors park their car", "handbook.html", "minus two"),
    ("when is the quarterly review", "notes.txt", "14th of April"),
    ("how high is Etna", "etna.pdf", "3,357"),
    ("do hikers need a guide near the summit", "etna.pdf", "authorised guide"),
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "bread.md").write_text(BREAD)
    (root / "bike.md").write_text(BIKE)
    (root / "sub" / "handbook.html").write_text(HTML)
    (root / "sub" / "notes.txt").write_text(NOTES)
    (root / "image.png").write_bytes(b"\x89PNG not a document")
    write_pdf(root / "etna.pdf", PDF_PAGES)
    return root


@pytest.fixture
async def index(tmp_path: Path):  # type: ignore[no-untyped-def]
    kb = await KnowledgeIndex.open(tmp_path / "knowledge.sqlite")
    yield kb
    await kb.close()


def name() -> str:
    return f"kb-{uuid.uuid4().hex[:12]}"


# -- parsing and chunking (no I/O beyond tmp files) ------------------------


def test_pdf_pages_are_parsed(tmp_path: Path) -> None:
    write_pdf(tmp_path / "a.pdf", PDF_PAGES)
    sections = parse(tmp_path / "a.pdf")
    assert [s.page for s in sections] == [1, 2]
    assert "3,357" in sections[0].text and "authorised guide" in sections[1].text


def test_html_drops_script_and_style_and_keeps_headings() -> None:
    sections = parse_html(HTML)
    text = " ".join(s.text for s in sections)
    assert "zanzibarquokka" not in text and "papayawhip" not in text and "function" not in text
    assert ("Office handbook", "Parking") in [s.heading for s in sections]


def test_markdown_headings_skip_code_fences() -> None:
    sections = parse_markdown("# A\n\ntext\n\n```\n# not a heading\n```\n\n## B\n\nmore\n")
    assert [s.heading for s in sections] == [("A",), ("A", "B")]


def test_chunks_overlap_follow_structure_and_never_cut_words() -> None:
    words = " ".join(f"w{i}" + ("." if i % 7 == 0 else "") for i in range(600))
    text = f"# Top\n\n{words}\n\n## Next\n\nshort paragraph\n"
    chunks = chunk_sections(parse_markdown(text))
    assert all(len(c.text) <= 800 for c in chunks)
    assert chunks[-1].heading == ("Top", "Next") and chunks[-1].text == "short paragraph"
    vocab = set(words.split())
    for a, b in itertools.pairwise(chunks[:-1]):
        assert set(b.text.split()) <= vocab  # whole words only
        assert text[b.offset : b.offset + len(b.text)] == b.text  # offsets point into the file
        overlap = text[b.offset : a.offset + len(a.text)]
        assert 0 < len(overlap) <= 150


# -- ingestion, retrieval, removal, rebuild (NATS + SQLite + embedder) --------


async def test_questions_find_their_chunk(nc: Client, index: KnowledgeIndex, corpus: Path) -> None:
    c = name()
    seen: list[tuple[int, int, bool]] = []

    class Progress:
        def update(self, done: int, records: int, final: bool = False) -> None:
            seen.append((done, records, final))

    report = await ingest(nc, index, c, [corpus], progress=lambda total: Progress())
    assert sorted(Path(p).name for p in report.added) == [
        "bike.md",
        "bread.md",
        "etna.pdf",
        "handbook.html",
        "notes.txt",
    ]
    assert report.pages == 6 and not report.failed
    assert seen[-1] == (5, report.chunks, True)
    # A file counts once its chunks are embedded and stored, not when it is read.
    assert seen[0][0] == 1 and seen[0][1] > 0
    assert [d for d, _, _ in seen[:-1]] == [1, 2, 3, 4, 5]
    for question, file, answer in QUESTIONS:
        hits = await index.search(c, question, k=3)
        assert any(Path(h.path).name == file and answer in h.text for h in hits), (question, hits)
    pdf = [h for h in await index.search(c, "Etna summit height", k=3) if h.path.endswith(".pdf")]
    assert pdf and pdf[0].position.page == 1
    wifi = (await index.search(c, "guest wifi password", k=1))[0]
    assert wifi.heading == ("Office handbook", "Wi-Fi")


async def test_script_text_is_not_indexed(nc: Client, index: KnowledgeIndex, corpus: Path) -> None:
    c = name()
    await ingest(nc, index, c, [corpus])
    assert await index.search(c, "zanzibarquokka", k=5, keyword_only=True) == []
    assert await index.search(c, "papayawhip trackingSecret", k=5, keyword_only=True) == []


async def test_unchanged_files_add_nothing(nc: Client, index: KnowledgeIndex, corpus: Path) -> None:
    c = name()
    log = KnowledgeLog.of(nc)
    await ingest(nc, index, c, [corpus])
    before = await log.last_seq(c)
    again = await ingest(nc, index, c, [corpus])
    assert again.added == again.updated == again.removed == [] and len(again.unchanged) == 5
    assert await log.last_seq(c) == before


async def test_changed_file_replaces_its_chunks(
    nc: Client, index: KnowledgeIndex, corpus: Path
) -> None:
    c = name()
    await ingest(nc, index, c, [corpus])
    bike = corpus / "bike.md"
    bike.write_text(BIKE.replace("5.5 bar", "6.2 bar"))
    report = await ingest(nc, index, c, [corpus])
    assert report.updated == [str(bike)] and report.added == [] and len(report.unchanged) == 4
    hits = await index.search(c, "what tyre pressure for road bike tyres", k=3)
    assert any("6.2 bar" in h.text for h in hits)
    assert not any("5.5 bar" in h.text for h in await index.search(c, "5.5 bar", k=10))
    docs = {d.path: d for d in await index.documents(c)}
    assert docs[str(bike)].sha256 == __import__("hashlib").sha256(bike.read_bytes()).hexdigest()
    kinds = [type(e) for _, e in await KnowledgeLog.of(nc).read(c)][-2:]
    assert kinds == [DocumentRemoved, DocumentAdded]


async def test_removing_files(nc: Client, index: KnowledgeIndex, corpus: Path) -> None:
    c = name()
    await ingest(nc, index, c, [corpus])
    # Gone from a folder ingested before: removed at the next ingestion of that folder.
    (corpus / "sub" / "notes.txt").unlink()
    report = await ingest(nc, index, c, [corpus])
    assert report.removed == [str(corpus / "sub" / "notes.txt")]
    assert not any("April" in h.text for h in await index.search(c, "quarterly review", k=10))
    # Removed explicitly.
    report = await remove(nc, index, c, [corpus / "bread.md"])
    assert report.removed == [str(corpus / "bread.md")]
    assert not any("bread.md" in h.path for h in await index.search(c, "sourdough loaf", k=10))
    assert sorted(Path(d.path).name for d in await index.documents(c)) == [
        "bike.md",
        "etna.pdf",
        "handbook.html",
    ]
    assert (await index.hybrid.count()) == sum(d.chunks for d in await index.documents(c))
    listed = {x.name: x for x in await collections(nc)}
    assert listed[c].documents == 3


async def test_same_content_at_two_paths_is_shared(
    nc: Client, index: KnowledgeIndex, tmp_path: Path
) -> None:
    c = name()
    (tmp_path / "a.txt").write_text(NOTES)
    (tmp_path / "b.txt").write_text(NOTES)
    await ingest(nc, index, c, [tmp_path / "a.txt", tmp_path / "b.txt"])
    await remove(nc, index, c, [tmp_path / "a.txt"])
    hits = await index.search(c, "marketing budget", k=1)
    assert hits and hits[0].path == str(tmp_path / "b.txt")


async def test_threshold_drops_unrelated_hits(
    nc: Client, index: KnowledgeIndex, corpus: Path
) -> None:
    c = name()
    await ingest(nc, index, c, [corpus])
    assert await index.search(c, "quantum chromodynamics of gluons", k=5, threshold=0.5) == []
    hits = await index.search(c, "guest wifi password", k=5, threshold=0.3)
    assert hits and all(h.similarity >= 0.3 for h in hits)


async def test_rebuild_from_log_gives_the_same_index(
    nc: Client, index: KnowledgeIndex, corpus: Path, tmp_path: Path
) -> None:
    c = name()
    await ingest(nc, index, c, [corpus])
    (corpus / "bike.md").write_text(BIKE + "\n## Lights\n\nUse a rear light from dusk.\n")
    await ingest(nc, index, c, [corpus])
    await remove(nc, index, c, [corpus / "sub" / "notes.txt"])
    queries = [q for q, _, _ in QUESTIONS]
    before_docs = await index.documents(c)
    before = [[(h.path, h.chunk, h.text) for h in await index.search(c, q, k=3)] for q in queries]
    fresh = await KnowledgeIndex.open(tmp_path / "rebuilt.sqlite")
    try:
        await fresh.rebuild(KnowledgeLog.of(nc))
        assert [(d.path, d.sha256, d.chunks) for d in await fresh.documents(c)] == [
            (d.path, d.sha256, d.chunks) for d in before_docs
        ]
        after = [
            [(h.path, h.chunk, h.text) for h in await fresh.search(c, q, k=3)] for q in queries
        ]
        assert after == before
    finally:
        await fresh.close()


async def test_an_index_made_by_another_model_is_indexed_again_on_its_next_sync(
    nc: Client, corpus: Path, tmp_path: Path
) -> None:
    path = tmp_path / "kb.sqlite"
    c = name()
    kb = await KnowledgeIndex.open(path)
    await ingest(nc, kb, c, [corpus])
    docs = [(d.path, d.sha256, d.chunks) for d in await kb.documents(c)]
    before = [
        [(h.path, h.chunk, h.text) for h in await kb.search(c, q, k=3)] for q, _, _ in QUESTIONS
    ]
    await kb.close()
    db = sqlite.connect(path)
    db.execute("UPDATE memory_meta SET value = 'an-older-model' WHERE key = 'model'")
    db.commit()
    db.close()

    kb = await KnowledgeIndex.open(path)
    try:
        assert kb.hybrid.model_changed and await kb.documents(c) == []
        await kb.sync(KnowledgeLog.of(nc), c)  # what the actor does before a search
        after = [
            [(h.path, h.chunk, h.text) for h in await kb.search(c, q, k=3)] for q, _, _ in QUESTIONS
        ]
        assert after == before
        assert [(d.path, d.sha256, d.chunks) for d in await kb.documents(c)] == docs
    finally:
        await kb.close()


async def test_missing_unknown_path_is_an_error(
    nc: Client, index: KnowledgeIndex, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError):
        await ingest(nc, index, name(), [tmp_path / "nope.md"])


# -- overlapping callers (a stub embedder that holds its first call) --------

AT = datetime(2026, 5, 1, tzinfo=UTC)
SECRET = "quokkavault"


def document(collection: str, version: str, texts: list[str]) -> DocumentAdded:
    return DocumentAdded(
        collection=collection,
        path="/docs/vault.md",
        sha256=version * 64,
        chunks=tuple(
            ChunkData(text=t, position=Position(offset=100 * i)) for i, t in enumerate(texts)
        ),
        at=AT,
        total=len(texts),
    )


def removal(added: DocumentAdded) -> DocumentRemoved:
    return DocumentRemoved(collection=added.collection, path=added.path, sha256=added.sha256, at=AT)


class ListLog:
    """KB_EVENTS as a list, for `sync` and `rebuild`."""

    def __init__(self, *events: KbEvent) -> None:
        self.events = list(events)

    async def read(
        self, collection: str | None = None, *, after: int = 0
    ) -> list[tuple[int, KbEvent]]:
        return [
            (seq, e)
            for seq, e in enumerate(self.events, 1)
            if seq > after and collection in (None, e.collection)
        ]


@contextlib.contextmanager
def waits_noticed() -> Iterator[asyncio.Event]:
    """Set when a caller of the index waits for another (the index logs it)."""
    noticed = asyncio.Event()

    def spot(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if event["event"] == "knowledge.waiting":
            noticed.set()
        return event

    with structlog.testing.capture_logs(processors=[spot]):
        yield noticed


async def done_or_waiting(task: asyncio.Task[Any], noticed: asyncio.Event) -> None:
    """Until `task` has finished, or waits behind the call that holds the embedder."""
    waiting = asyncio.ensure_future(noticed.wait())
    await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()


async def left_of(kb: KnowledgeIndex, collection: str, word: str) -> list[str]:
    """Chunks of `collection` with `word`, as stored, whether a document names them or not."""
    hits = await kb.hybrid.keyword_search([collection_scope(collection)], query_text=word, k=50)
    return [h.text for h in hits]


@pytest.mark.parametrize("then", ["removed", "replaced"])
async def test_a_document_removed_while_its_chunks_are_embedded_leaves_no_chunk(
    tmp_path: Path, then: str
) -> None:
    embedder = HeldEmbedder()
    kb = await KnowledgeIndex.open(tmp_path / "kb.sqlite", embedder=cast(Any, embedder))
    c = name()
    old = document(c, "a", [f"The vault code is {SECRET} {i}." for i in range(3)])
    new = document(c, "b", ["The vault moved to the cellar."])
    later: KbEvent = removal(old) if then == "removed" else new
    try:
        with waits_noticed() as noticed:
            adding = asyncio.create_task(kb.apply([(1, old)]))
            await embedder.embedding.wait()
            following = asyncio.create_task(kb.apply([(2, later)]))
            await done_or_waiting(following, noticed)
            embedder.release.set()
            await asyncio.gather(adding, following)
        assert await left_of(kb, c, SECRET) == []
        assert await kb.search(c, SECRET, k=5, keyword_only=True) == []
        assert await kb.checkpoint(c) == 2
        if then == "removed":
            assert await kb.hybrid.count() == 0 and await kb.documents(c) == []
        else:
            assert await kb.hybrid.count() == 1
            assert [d.sha256 for d in await kb.documents(c)] == [new.sha256]
            assert await left_of(kb, c, "cellar") == ["The vault moved to the cellar."]
    finally:
        await kb.close()


@pytest.mark.parametrize("second", ["sync", "rebuild"])
async def test_a_sync_or_rebuild_waits_for_a_sync_of_the_collection(
    tmp_path: Path, second: str
) -> None:
    embedder = HeldEmbedder()
    kb = await KnowledgeIndex.open(tmp_path / "kb.sqlite", embedder=cast(Any, embedder))
    c = name()
    added = document(c, "a", [f"The vault code is {SECRET} {i}." for i in range(3)])
    log = ListLog(added)
    try:
        with waits_noticed() as noticed:
            first = asyncio.create_task(kb.sync(cast(KnowledgeLog, log), c))  # a search
            await embedder.embedding.wait()
            log.events.append(removal(added))  # `veil kb rm` meanwhile
            other = asyncio.create_task(
                kb.sync(cast(KnowledgeLog, log), c)
                if second == "sync"
                else kb.rebuild(cast(KnowledgeLog, log))
            )
            await done_or_waiting(other, noticed)
            embedder.release.set()
            await asyncio.gather(first, other)
        assert await left_of(kb, c, SECRET) == []
        assert (await kb.hybrid.count(), await kb.documents(c)) == (0, [])
        assert await kb.checkpoint(c) == 2
    finally:
        await kb.close()


async def test_a_stale_copy_of_the_log_does_not_undo_what_followed(tmp_path: Path) -> None:
    # A caller that read the log before a removal applies what it read after it.
    embedder = HeldEmbedder()
    embedder.release.set()
    kb = await KnowledgeIndex.open(tmp_path / "kb.sqlite", embedder=cast(Any, embedder))
    c = name()
    added = document(c, "a", [f"The vault code is {SECRET}."])
    try:
        await kb.apply([(1, added), (2, removal(added))])
        await kb.apply([(1, added)])
        assert (await kb.hybrid.count(), await kb.documents(c)) == (0, [])
        await kb.apply([(2, removal(added))])  # the last event again: nothing changes
        assert await kb.checkpoint(c) == 2
    finally:
        await kb.close()
