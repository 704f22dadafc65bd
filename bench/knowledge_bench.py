"""Knowledge base: ingestion rate, retrieval latency at 10k and 100k chunks, recall@5.

Everything is real except where said: a nats-server with JetStream (spawned here),
SQLite + sqlite-vec + FTS5 in a temp dir, the int8 all-MiniLM-L6-v2 embedder.

- Corpus (written for this bench, no third-party text): 36 facts of a fictional
  company, each put under its own heading in one of 6 documents (3 Markdown, 1 HTML,
  1 text, 1 PDF of 6 pages written by hand), between paragraphs of everyday filler
  so chunks compete. 36 questions, one per fact, most worded without the fact's
  rare words (paraphrase) and some with them (keyword); a question counts as found
  when a top-5 chunk contains its answer string.
- Ingestion rate: the corpus plus 40 generated Markdown manuals and a 60-page PDF
  through `ingest` (parse, chunk, append to KB_EVENTS, embed, index), wall clock.
- Latency: `KnowledgeIndex.search` (query embedding included, each query distinct)
  over one collection of 10k then 100k chunks. The filler chunks beyond the corpus
  are random-word texts with RANDOM unit vectors (not embedded: embedding 100k
  chunks takes ~20 min on 2 cores), applied as real DocumentAdded events.

Run from the repository root: /work/venv/bin/python bench/knowledge_bench.py
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import nats
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.knowledge import KnowledgeIndex, ingest
from actors.knowledge.log import KnowledgeLog
from actors.memory.embedder import default_embedder
from eventstore.knowledge import ChunkData, DocumentAdded, Position
from testkit.pdf import write_pdf
from testkit.procs import nats_server

# (document, heading, fact paragraph, question, answer string)
FACTS = [
    (
        "handbook.md",
        "Working hours",
        "Core hours at Norwell Labs run from 10:00 to 15:30; outside them staff plan their own day.",
        "when must employees be present",
        "10:00 to 15:30",
    ),
    (
        "handbook.md",
        "Holidays",
        "Every employee receives 27 days of paid leave per calendar year, plus public holidays.",
        "how much annual vacation do staff get",
        "27 days",
    ),
    (
        "handbook.md",
        "Sick leave",
        "Report an illness to your team lead before 9:00; a doctor's note is needed from the fourth day.",
        "when is a medical certificate required",
        "fourth day",
    ),
    (
        "handbook.md",
        "Remote work",
        "Staff may work from home up to three days a week after their probation period.",
        "how often can I work from my flat",
        "three days a week",
    ),
    (
        "handbook.md",
        "Expenses",
        "Expense claims go through the Ledgerly app and are reimbursed with the next payroll.",
        "how do I get my money back for a business purchase",
        "Ledgerly",
    ),
    (
        "handbook.md",
        "Probation",
        "The probation period lasts six months, with a review meeting after month three.",
        "how long is the trial period for new hires",
        "six months",
    ),
    (
        "it.md",
        "Laptops",
        "New starters get a 14-inch ThinkPad T14 with 32 GB of memory; developers may choose a MacBook Pro instead.",
        "which computer will I receive on my first day",
        "ThinkPad T14",
    ),
    (
        "it.md",
        "Passwords",
        "Passwords must have at least 14 characters and are rotated only after a suspected leak.",
        "what is the minimum password length",
        "14 characters",
    ),
    (
        "it.md",
        "VPN",
        "The VPN client is WireGuard; the configuration file is issued by the service desk on request.",
        "which software connects me to the internal network from outside",
        "WireGuard",
    ),
    (
        "it.md",
        "Printing",
        "The only colour printer is on the second floor next to the kitchen and prints with badge release.",
        "where can I print in colour",
        "second floor",
    ),
    (
        "it.md",
        "Support",
        "The service desk answers on extension 4400 between 8:00 and 18:00.",
        "what number do I call for computer problems",
        "4400",
    ),
    (
        "it.md",
        "Backups",
        "Laptops are backed up every night at 02:00 to the Frankfurt data centre and kept for 90 days.",
        "how long are backups retained",
        "90 days",
    ),
    (
        "it.md",
        "Software requests",
        "Licences for paid software are requested in the Toolbox portal and approved by the budget owner.",
        "how do I ask for a paid program",
        "Toolbox portal",
    ),
    (
        "finance.md",
        "Travel",
        "Train is mandatory for trips under 600 kilometres; flights need the approval of a director.",
        "can I fly to a city that is close by",
        "600 kilometres",
    ),
    (
        "finance.md",
        "Per diem",
        "The daily allowance abroad is 48 euros, 24 euros for a day trip.",
        "how much meal money do I get per day abroad",
        "48 euros",
    ),
    (
        "finance.md",
        "Hotels",
        "Hotels may cost up to 160 euros a night, 220 in London, Paris and New York.",
        "what is the cap for accommodation in London",
        "220",
    ),
    (
        "finance.md",
        "Corporate card",
        "Corporate credit cards are issued by Fjord Bank with a monthly limit of 3,000 euros.",
        "which bank issues the company credit card",
        "Fjord Bank",
    ),
    (
        "finance.md",
        "Invoices",
        "Supplier invoices are paid within 30 days, on Tuesdays only.",
        "on which weekday are bills from vendors settled",
        "Tuesdays",
    ),
    (
        "finance.md",
        "Fiscal year",
        "The fiscal year starts on 1 July and ends on 30 June.",
        "when does the financial year begin",
        "1 July",
    ),
    (
        "office.html",
        "Address",
        "The head office is at Kestrel Street 18, Utrecht, on the fourth floor.",
        "where is the main office located",
        "Kestrel Street 18",
    ),
    (
        "office.html",
        "Bicycles",
        "Bicycles go to the basement garage; the bike room opens with your badge.",
        "where can I leave my bike",
        "basement garage",
    ),
    (
        "office.html",
        "Canteen",
        "The canteen serves a hot lunch from 11:45 to 13:45, with a vegan dish every day.",
        "at what time can I eat at work",
        "11:45 to 13:45",
    ),
    (
        "office.html",
        "Meeting rooms",
        "Meeting rooms are booked in the Roomie app; bookings not confirmed within 10 minutes are released.",
        "what happens if I do not show up for my room booking",
        "released",
    ),
    (
        "office.html",
        "Visitors",
        "Visitors sign in at the front desk and receive a red lanyard.",
        "what colour badge strap do guests wear",
        "red lanyard",
    ),
    (
        "office.html",
        "Fire safety",
        "The assembly point after an evacuation is the car park of the Meridian church.",
        "where do we gather if the building is evacuated",
        "Meridian church",
    ),
    (
        "notes.txt",
        "",
        "Decision: the mobile app will be rewritten in Kotlin Multiplatform, starting in the third quarter.",
        "what technology was chosen for the new phone app",
        "Kotlin Multiplatform",
    ),
    (
        "notes.txt",
        "",
        "Anneke de Vries replaces Tom Baker as head of customer success from 1 May.",
        "who leads customer success now",
        "Anneke de Vries",
    ),
    (
        "notes.txt",
        "",
        "The yearly company retreat will take place in Bruges from 12 to 14 September.",
        "where is the annual offsite this year",
        "Bruges",
    ),
    (
        "notes.txt",
        "",
        "Customer churn fell to 2.1 percent per month after the pricing change.",
        "how many clients are we losing each month",
        "2.1 percent",
    ),
    (
        "notes.txt",
        "",
        "The office will be closed between Christmas and New Year for maintenance of the heating.",
        "is the building open at the end of December",
        "closed between Christmas",
    ),
    (
        "security.pdf",
        "",
        "Access badges must be worn visibly at all times inside the building.",
        "do I have to show my pass in the office",
        "worn visibly",
    ),
    (
        "security.pdf",
        "",
        "Lost badges are reported to security on extension 4999 and blocked within one hour.",
        "who do I tell when I lose my access card",
        "4999",
    ),
    (
        "security.pdf",
        "",
        "Confidential paper goes into the locked grey bins, which are shredded every Friday.",
        "how do I dispose of sensitive documents",
        "grey bins",
    ),
    (
        "security.pdf",
        "",
        "Phishing mails are forwarded to phish@norwell.example and then deleted.",
        "what should I do with a suspicious email",
        "phish@norwell.example",
    ),
    (
        "security.pdf",
        "",
        "Screens lock automatically after five minutes without activity.",
        "after how long does my computer lock itself",
        "five minutes",
    ),
    (
        "security.pdf",
        "",
        "USB sticks from outside the company may not be plugged into work machines.",
        "can I use a memory stick a client gave me",
        "USB sticks",
    ),
]
FILLER = [
    "The weather in spring changes quickly, so people often carry an umbrella and a light jacket.",
    "Good coffee depends on fresh beans, clean water and a grinder that gives an even size.",
    "A short walk after lunch helps many people stay focused during the afternoon.",
    "Plants on a desk need light more than water; most die from too much care.",
    "Teams that write things down spend less time repeating the same conversations.",
    "Long meetings rarely decide more than short ones with a clear agenda.",
    "The city library lends books, films and board games, and its reading room is quiet.",
    "Traffic on the ring road is heaviest on Monday mornings and Friday afternoons.",
    "Most birthday cakes in the office come from the bakery on the corner.",
    "Keeping a tidy desk is a habit that takes a few weeks to build.",
]


def build_corpus(root: Path, rng: random.Random) -> None:
    by_doc: dict[str, list[tuple[str, str]]] = {}
    for doc, heading, fact, _, _ in FACTS:
        by_doc.setdefault(doc, []).append((heading, fact))

    def filler(n: int) -> str:
        return " ".join(rng.sample(FILLER, n))

    for doc, items in by_doc.items():
        if doc.endswith(".md"):
            parts = [f"# {doc[:-3].title()} guide\n\n{filler(3)}\n"]
            parts += [f"## {h}\n\n{filler(2)}\n\n{f}\n\n{filler(2)}\n" for h, f in items]
            (root / doc).write_text("\n".join(parts))
        elif doc.endswith(".html"):
            body = "".join(
                f"<h2>{h}</h2><p>{filler(2)}</p><p>{f}</p><p>{filler(1)}</p>" for h, f in items
            )
            (root / doc).write_text(
                f"<html><head><script>var x = 'tracking';</script></head><body><h1>Office</h1>{body}</body></html>"
            )
        elif doc.endswith(".txt"):
            (root / doc).write_text("\n\n".join(f"{filler(2)}\n\n{f}" for _, f in items))
        else:
            pages = [[*_wrap(filler(3)), "", *_wrap(f), "", *_wrap(filler(2))] for _, f in items]
            write_pdf(root / doc, pages)


def _wrap(text: str, width: int = 90) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line]


def build_bulk(root: Path, rng: random.Random, vocab: list[str]) -> None:
    for i in range(40):
        sections = []
        for s in range(12):
            paras = [" ".join(rng.choices(vocab, k=rng.randint(40, 120))) + "." for _ in range(3)]
            sections.append(f"## Section {s}\n\n" + "\n\n".join(paras))
        (root / f"manual{i:02d}.md").write_text(f"# Manual {i}\n\n" + "\n\n".join(sections))
    pages = [_wrap(" ".join(rng.choices(vocab, k=350))) for _ in range(60)]
    write_pdf(root / "big.pdf", pages)


class RandomEmbedder:
    """Random unit vectors, for filler only (see the module docstring)."""

    dim = 384
    model_id = "random"

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    async def aembed(self, texts: list[str]) -> np.ndarray:
        v = self._rng.standard_normal((len(texts), self.dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


async def fill(
    index: KnowledgeIndex, collection: str, count: int, rng: random.Random, vocab: list[str]
) -> None:
    real = index.embedder
    index.embedder = RandomEmbedder(rng.randint(0, 1 << 30))
    try:
        per_doc = 500
        for d in range(0, count, per_doc):
            chunks = tuple(
                ChunkData(
                    text=" ".join(rng.choices(vocab, k=110)), position=Position(offset=i * 800)
                )
                for i in range(min(per_doc, count - d))
            )
            event = DocumentAdded(
                collection=collection,
                path=f"/filler/{rng.random()}.txt",
                sha256=f"{rng.getrandbits(256):064x}",
                chunks=chunks,
                at=datetime.now(UTC),
                total=len(chunks),
            )
            await index.apply([(10**9, event)])
    finally:
        index.embedder = real


async def recall(index: KnowledgeIndex, collection: str, keyword_only: bool) -> float:
    found = 0
    for _, _, _, question, answer in FACTS:
        hits = await index.search(collection, question, k=5, keyword_only=keyword_only)
        found += any(answer in h.text for h in hits)
    return found / len(FACTS)


async def latency(
    index: KnowledgeIndex, collection: str, queries: list[str]
) -> tuple[float, float]:
    times = []
    for q in queries:
        t = time.perf_counter()
        await index.search(collection, q, k=5)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


async def main() -> None:
    rng = random.Random(7)
    vocab = sorted(
        {w.strip(".,;:'").lower() for _, _, f, q, _ in FACTS for w in f.split() + q.split()}
        | {w.strip(".,").lower() for s in FILLER for w in s.split()}
    )
    vocab += [f"term{i}" for i in range(5000)]
    default_embedder().embed(["warm up"])
    with tempfile.TemporaryDirectory() as tmp, nats_server(Path(tmp) / "nats") as server:
        nc = await nats.connect(server.url)
        index = await KnowledgeIndex.open(Path(tmp) / "knowledge.sqlite")
        try:
            corpus, bulk = Path(tmp) / "corpus", Path(tmp) / "bulk"
            corpus.mkdir()
            bulk.mkdir()
            build_corpus(corpus, rng)
            build_bulk(bulk, rng, vocab)

            t = time.perf_counter()
            report = await ingest(nc, index, "bench", [corpus])
            t_corpus = time.perf_counter() - t
            t = time.perf_counter()
            bulk_report = await ingest(nc, index, "bulk", [bulk])
            t_bulk = time.perf_counter() - t
            chunks = report.chunks + bulk_report.chunks
            pages = report.pages + bulk_report.pages
            print(
                f"ingest corpus: {len(report.added)} docs, {report.pages} pages, {report.chunks} chunks in {t_corpus:.2f} s"
            )
            print(
                f"ingest bulk:   {len(bulk_report.added)} docs, {bulk_report.pages} pages, {bulk_report.chunks} chunks in {t_bulk:.2f} s"
            )
            print(
                f"ingestion rate: {chunks / (t_corpus + t_bulk):.1f} chunks/s, {pages / (t_corpus + t_bulk):.1f} pages/s"
                " (parse + chunk + append + embed + index)"
            )
            t = time.perf_counter()
            again = await ingest(nc, index, "bulk", [bulk])
            print(
                f"re-ingest unchanged bulk: {len(again.unchanged)} unchanged, {len(again.added)} added in {time.perf_counter() - t:.2f} s"
            )

            hy, kw = await recall(index, "bench", False), await recall(index, "bench", True)
            print(
                f"recall@5 over {len(FACTS)} questions ({report.chunks} chunks): hybrid {hy:.3f}, keyword-only {kw:.3f}"
            )

            queries = [f"{q} {rng.choice(vocab)}" for _, _, _, q, _ in FACTS for _ in range(6)][
                :200
            ]
            for target in (10_000, 100_000):
                have = sum(d.chunks for d in await index.documents("bench"))
                t = time.perf_counter()
                await fill(index, "bench", target - have, rng, vocab)
                print(
                    f"filled to {target} chunks in {time.perf_counter() - t:.1f} s (random vectors)"
                )
                p50, p99 = await latency(index, "bench", queries)
                hy = await recall(index, "bench", False)
                kw = await recall(index, "bench", True)
                print(
                    f"  search k=5 at {target} chunks: p50 {p50:.2f} ms, p99 {p99:.2f} ms "
                    f"(incl. query embedding; {len(queries)} queries); recall@5 hybrid {hy:.3f}, keyword-only {kw:.3f}"
                )
            t = time.perf_counter()
            rebuilt = await KnowledgeIndex.open(Path(tmp) / "rebuilt.sqlite")
            n = await rebuilt.rebuild(KnowledgeLog.of(nc))
            print(
                f"rebuild from log: {n} events, {sum(d.chunks for d in await rebuilt.documents('bench'))}"
                f" + {sum(d.chunks for d in await rebuilt.documents('bulk'))} chunks in {time.perf_counter() - t:.1f} s"
            )
            await rebuilt.close()
        finally:
            await index.close()
            await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
