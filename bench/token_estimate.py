"""How close Veil's token estimate (actors/tokens.py) is to a real tokenizer.

Compares estimate_tokens with the SmolLM2 BPE tokenizer (read from its GGUF by
llama.cpp, vocab_only: no weights are loaded) over the texts of the memory
evaluation set and this repository's Markdown and Python files. Prints the
ratio estimate/real per text kind: p50, p10, p90, and the total.

    python bench/token_estimate.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from actors.tokens import estimate_tokens


def texts() -> dict[str, list[str]]:
    chat: list[str] = []
    for line in (ROOT / "bench/data/memory_eval.jsonl").read_text().splitlines():
        record = json.loads(line)
        for side in ("user", "assistant"):
            if isinstance(record.get(side), dict):
                chat.append(record[side]["text"])
    # README paragraphs: prose with some code and tables.
    docs = [p for p in (ROOT / "README.md").read_text().split("\n\n") if len(p) > 40]
    code = [p.read_text() for p in sorted((ROOT / "actors").rglob("*.py"))]
    return {"chat messages": chat, "markdown": docs, "python code": code}


def main() -> None:
    from llama_cpp import Llama

    from actors.engines.llamacpp import smollm2_path

    tokenizer = Llama(model_path=str(smollm2_path()), vocab_only=True, verbose=False)
    print("estimate / SmolLM2 BPE tokens (1.00 = exact; above 1 overestimates)")
    for kind, items in texts().items():
        items = [t for t in items if t.strip()]
        ratios = []
        est_total = real_total = 0
        for text in items:
            real = len(tokenizer.tokenize(text.encode(), add_bos=False, special=False))
            est = estimate_tokens(text)
            if real:
                ratios.append(est / real)
            est_total += est
            real_total += real
        q = statistics.quantiles(ratios, n=10)
        print(
            f"  {kind:14} n={len(items):5}  p50 {statistics.median(ratios):.2f}  "
            f"p10 {q[0]:.2f}  p90 {q[-1]:.2f}  total {est_total / real_total:.2f}"
        )


if __name__ == "__main__":
    main()
