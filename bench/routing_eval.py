"""Routing benchmark: decision latency and accuracy of the router on a labelled set of turns.

The pipelines and their rules and examples are in bench/data/routing_pipelines.toml, the
labelled turns in bench/data/routing_utterances.jsonl (written by hand, none of them an
example). Prints latency p50/p99, accuracy overall, per pipeline, per tag and per means,
a confusion matrix, "rules + semantic" against "rules only" and "semantic only", and a
sweep of semantic thresholds. Uses the real local embedder (all-MiniLM-L6-v2, int8).

Run from the repository root (about 10 s on 2 cores):

    python bench/routing_eval.py [--threshold T] [--repeat 5] [--errors] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import tomllib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.memory.embedder import Embedder, default_embedder
from actors.routing import AsyncEmbedder, Router
from config import DEFAULT_THRESHOLD, RoutingRules
from contracts.router import RouteDecision

__all__ = ["main"]

DATA = Path(__file__).resolve().parent / "data"
SWEEP = [0.05, *(round(0.1 + 0.025 * i, 3) for i in range(17)), 0.6, 0.7]  # finer where it matters


class Turn(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    label: str
    tag: str
    metadata: dict[str, str] = {}


@dataclass
class Run:
    """The decisions of one router configuration over every turn."""

    name: str
    decisions: list[RouteDecision]
    latencies_ms: list[float] = field(default_factory=list)

    def accuracy(self, turns: Sequence[Turn], keep: set[int] | None = None) -> tuple[int, int]:
        idx = [i for i in range(len(turns)) if keep is None or i in keep]
        right = sum(self.decisions[i].pipeline == turns[i].label for i in idx)
        return right, len(idx)


class CachedEmbedder:
    """Memoises the real embedder so the threshold sweep does not embed the same turn again."""

    def __init__(self, inner: Embedder) -> None:
        self._inner = inner
        self._cache: dict[str, npt.NDArray[np.float32]] = {}

    async def aembed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for text, vector in zip(missing, await self._inner.aembed(missing), strict=True):
                self._cache[text] = vector
        return np.stack([self._cache[t] for t in texts])


def load_candidates(path: Path) -> dict[str, RoutingRules]:
    raw = tomllib.loads(path.read_text())["pipelines"]
    return {name: msgspec.convert(p.get("routing", {}), RoutingRules) for name, p in raw.items()}


def load_turns(path: Path) -> list[Turn]:
    decoder = msgspec.json.Decoder(Turn)
    return [decoder.decode(line) for line in path.read_bytes().splitlines() if line.strip()]


def without_rules(candidates: dict[str, RoutingRules]) -> dict[str, RoutingRules]:
    return {
        n: msgspec.structs.replace(r, keywords=[], patterns=[], metadata={})
        for n, r in candidates.items()
    }


def without_default_examples(candidates: dict[str, RoutingRules]) -> dict[str, RoutingRules]:
    first = next(iter(candidates))
    return {
        n: msgspec.structs.replace(r, examples=[]) if n == first else r
        for n, r in candidates.items()
    }


async def run(name: str, router: Router, turns: Sequence[Turn], repeat: int = 0) -> Run:
    """Route every turn; with `repeat`, time that many extra passes after a warm-up."""
    await router.prepare()
    result = Run(name, [await router.route(t.text, t.metadata, None) for t in turns])
    for _ in range(repeat):
        for turn in turns:
            start = time.perf_counter_ns()
            await router.route(turn.text, turn.metadata, None)
            result.latencies_ms.append((time.perf_counter_ns() - start) / 1e6)
    return result


def pct(right: int, total: int) -> str:
    return f"{100 * right / total:5.1f}% ({right}/{total})" if total else "   -"


def percentiles(values: Sequence[float]) -> str:
    p50, p99 = np.percentile(values, [50, 99])
    return f"p50 {p50:.3f} ms  p99 {p99:.3f} ms  max {max(values):.3f} ms  (n={len(values)})"


def report(
    main_run: Run, others: Sequence[Run], turns: Sequence[Turn], names: Sequence[str]
) -> None:
    by_means: dict[str, list[float]] = defaultdict(list)
    per_turn = len(main_run.latencies_ms) // len(turns)
    for k, ms in enumerate(main_run.latencies_ms):
        by_means[main_run.decisions[k % len(turns)].means].append(ms)
    print(f"\nDecision latency, {main_run.name} ({per_turn} timed passes over {len(turns)} turns)")
    print(f"  all           {percentiles(main_run.latencies_ms)}")
    for means, values in sorted(by_means.items()):
        print(f"  {means:<13} {percentiles(values)}")

    print(f"\nAccuracy          {'  '.join(f'{r.name:>22}' for r in [main_run, *others])}")
    rows: list[tuple[str, set[int] | None]] = [("overall", None)]
    rows += [(n, {i for i, t in enumerate(turns) if t.label == n}) for n in names]
    tags = sorted({t.tag for t in turns})
    rows += [(f"tag:{g}", {i for i, t in enumerate(turns) if t.tag == g}) for g in tags]
    for label, keep in rows:
        cells = "  ".join(f"{pct(*r.accuracy(turns, keep)):>22}" for r in [main_run, *others])
        print(f"  {label:<16}{cells}")

    for r in [main_run, *others]:
        print(f"\nBy means, {r.name}: decisions made and how many were right")
        groups: dict[str, list[int]] = defaultdict(list)
        for i, d in enumerate(r.decisions):
            groups[d.means].append(i)
        for means, idx in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            right = sum(r.decisions[i].pipeline == turns[i].label for i in idx)
            print(f"  {means:<14} {len(idx):4d} decisions, {pct(right, len(idx))} right")

    print(f"\nConfusion matrix, {main_run.name} (rows: label, columns: chosen)")
    width = max(len(n) for n in names) + 2
    print(" " * width + "".join(f"{n:>{width}}" for n in names))
    counts = Counter((t.label, d.pipeline) for t, d in zip(turns, main_run.decisions, strict=True))
    for label in names:
        print(f"{label:<{width}}" + "".join(f"{counts[label, c]:>{width}}" for c in names))


def print_errors(result: Run, turns: Sequence[Turn]) -> None:
    print(f"\nMisrouted by {result.name}:")
    for turn, d in zip(turns, result.decisions, strict=True):
        if d.pipeline != turn.label:
            detail = (d.detail or "")[:90]
            print(
                f"  [{turn.tag}] {turn.text[:70]!r}\n      want {turn.label}, got {d.pipeline} "
                f"by {d.means} ({detail}); runner-up {d.runner_up} {d.runner_up_score}"
            )


async def sweep(
    candidates: dict[str, RoutingRules],
    turns: Sequence[Turn],
    embedder: AsyncEmbedder,
    names: Sequence[str],
) -> list[dict[str, float]]:
    variants = {
        "rules+semantic": candidates,
        "semantic only": without_rules(candidates),
        "rules+sem, no default examples": without_default_examples(candidates),
    }
    general = {i for i, t in enumerate(turns) if t.label == names[0]}
    print(
        "\nThreshold sweep (accuracy; the last column is the share of the default's turns "
        "kept on the default by rules+semantic)"
    )
    print("  threshold  " + "".join(f"{v:>32}" for v in variants) + f"{'default kept':>16}")
    table: list[dict[str, float]] = []
    for threshold in SWEEP:
        row: dict[str, float] = {"threshold": threshold}
        cells = []
        for vname, cands in variants.items():
            result = await run(vname, Router(cands, embedder, semantic_threshold=threshold), turns)
            right, total = result.accuracy(turns)
            row[vname] = right / total
            cells.append(f"{pct(right, total):>32}")
            if vname == "rules+semantic":
                kept = result.accuracy(turns, general)
        row["default kept"] = kept[0] / kept[1]
        table.append(row)
        print(f"  {threshold:>9.3f}  " + "".join(cells) + f"{pct(*kept):>16}")
    return table


async def held_out(
    candidates: dict[str, RoutingRules], turns: Sequence[Turn], embedder: AsyncEmbedder
) -> None:
    """Pick the threshold on one half of the turns and score it on the other, both ways."""
    halves = [set(range(0, len(turns), 2)), set(range(1, len(turns), 2))]
    runs = {
        t: await run(str(t), Router(candidates, embedder, semantic_threshold=t), turns)
        for t in SWEEP
    }
    print("\nHeld-out check of the threshold (rules+semantic; even/odd halves of the turns)")
    for pick, score in [(0, 1), (1, 0)]:
        # Ties go to the higher threshold: fewer general turns leak to a specialist.
        best = max(SWEEP, key=lambda t: (runs[t].accuracy(turns, halves[pick])[0], t))
        print(
            f"  picked on half {pick}: {best}  ->  half {score}: "
            f"{pct(*runs[best].accuracy(turns, halves[score]))}"
        )


async def amain(args: argparse.Namespace) -> None:
    candidates = load_candidates(args.pipelines)
    turns = load_turns(args.utterances)
    names = list(candidates)
    unknown = {t.label for t in turns} - set(names)
    assert not unknown, f"labels with no pipeline: {unknown}"
    print(
        f"{len(turns)} labelled turns: "
        + ", ".join(f"{n} {sum(t.label == n for t in turns)}" for n in names)
    )
    print(
        "examples per pipeline: "
        + ", ".join(f"{n} {len(r.examples)}" for n, r in candidates.items())
    )

    embedder = default_embedder()
    embedder.embed(["warm up"])
    router = Router(candidates, embedder, semantic_threshold=args.threshold)
    start = time.perf_counter()
    await router.prepare()
    print(
        f"prepare(): embedded {sum(len(r.examples) for r in candidates.values())} examples "
        f"in {1000 * (time.perf_counter() - start):.1f} ms; semantic threshold {args.threshold}"
    )

    main_run = await run("rules+semantic", router, turns, repeat=args.repeat)
    rules_only = await run("rules only", Router(candidates, None), turns)
    cached = CachedEmbedder(embedder)
    semantic_only = await run(
        "semantic only",
        Router(without_rules(candidates), cached, semantic_threshold=args.threshold),
        turns,
    )
    report(main_run, [rules_only, semantic_only], turns, names)
    if args.errors:
        print_errors(main_run, turns)
    table = await sweep(candidates, turns, cached, names)
    await held_out(candidates, turns, cached)

    if args.json:
        lat = main_run.latencies_ms
        total = len(turns)
        args.json.write_text(
            json.dumps(
                {
                    "turns": total,
                    "threshold": args.threshold,
                    "latency_ms": {
                        "p50": float(np.percentile(lat, 50)),
                        "p99": float(np.percentile(lat, 99)),
                    },
                    "accuracy": {
                        r.name: r.accuracy(turns)[0] / total
                        for r in [main_run, rules_only, semantic_only]
                    },
                    "sweep": table,
                },
                indent=2,
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pipelines", type=Path, default=DATA / "routing_pipelines.toml")
    parser.add_argument("--utterances", type=Path, default=DATA / "routing_utterances.jsonl")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--repeat", type=int, default=5, help="timed passes over the turns")
    parser.add_argument("--errors", action="store_true", help="list the misrouted turns")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    main()
