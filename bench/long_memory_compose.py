"""Compose bench/data/long_memory.jsonl from the hand-written material in `_long_memory_source`.

Four conversations between two friends, 24 dated sessions each (a week or three
apart, over about a year), 17-19 turns a session: a greeting, chatter on each
speaker's recurring themes and everyday small talk, one fact turn (the evidence
of its questions) answered by a reaction, a goodbye. Seeded, so the file is the
same on every run; the composer checks that each question's evidence turn exists
and comes before the question is asked (after the conversation's last session).

    python bench/long_memory_compose.py [--out bench/data/long_memory.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._long_memory_source import (
    FACTS,
    FAREWELLS,
    GREETING_REPLIES,
    GREETINGS,
    PAIRS,
    QUESTIONS,
    REACTIONS,
    SMALL_TALK,
    THEMES,
)

OUT = Path(__file__).resolve().parent / "data" / "long_memory.jsonl"
SESSIONS = 24
_OPENERS = ["", "", "", "Honestly, ", "So, ", "Ugh, ", "Update: ", "Okay so ", "Random but "]
_TAILS = ["", "", "", " How about you?", " Anyway.", " Classic me.", " Such is life.", " Ha."]


def _vary(rng: random.Random, line: str) -> str:
    opener = rng.choice(_OPENERS)
    if opener and line[0].isupper() and not line.startswith("I "):
        line = line[0].lower() + line[1:]
    return opener + line + rng.choice(_TAILS)


def compose(seed: int = 15) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    lines: list[dict[str, Any]] = []
    n_turns = 0
    n_questions = 0
    for conv, a, b in PAIRS:
        facts_by_session: dict[int, list[tuple[str, str, str]]] = {}
        for fid, (session, speaker, text) in FACTS[conv].items():
            facts_by_session.setdefault(session, []).append((fid, speaker, text))
        evidence: dict[str, str] = {}
        day = datetime(2025, 1, 6, tzinfo=UTC) + timedelta(days=rng.randrange(0, 40))
        for s in range(1, SESSIONS + 1):
            day += timedelta(days=rng.randrange(7, 20))
            at = day.replace(hour=rng.randrange(8, 22), minute=rng.randrange(60))
            first, second = (a, b) if s % 2 else (b, a)
            lines.append(
                {"kind": "session", "conversation": conv, "session": s, "at": at.isoformat()}
            )
            # (speaker, text, fact id or "")
            said: list[tuple[str, str, str]] = [
                (first, rng.choice(GREETINGS).format(other=second), ""),
                (second, rng.choice(GREETING_REPLIES), ""),
            ]
            chatter = rng.randrange(12, 15)
            facts = facts_by_session.get(s, [])
            fact_at = {rng.randrange(2, chatter - 2): f for f in facts}
            talk = iter(rng.sample(SMALL_TALK, len(SMALL_TALK)))
            i = 0
            while i < chatter:
                speaker = said[-1][0] == a and b or a
                if i in fact_at and fact_at[i][1] == speaker:
                    fid, _, text = fact_at.pop(i)
                    said.append((speaker, text, fid))
                    said.append((a if speaker == b else b, rng.choice(REACTIONS), ""))
                    i += 2
                    continue
                if i in fact_at:  # the fact's speaker talks next
                    fact_at[i + 1] = fact_at.pop(i)
                source = THEMES[speaker] if rng.random() < 0.6 else None
                text = _vary(rng, rng.choice(source)) if source else next(talk)
                said.append((speaker, text, ""))
                i += 1
            assert not fact_at, (conv, s, fact_at)
            last = said[-1][0]
            said.append((b if last == a else a, rng.choice(FAREWELLS), ""))
            for t, (speaker, text, fid) in enumerate(said, 1):
                turn_id = f"{conv}-s{s:02d}-t{t:02d}"
                lines.append(
                    {
                        "kind": "turn",
                        "conversation": conv,
                        "session": s,
                        "id": turn_id,
                        "speaker": speaker,
                        "at": (at + timedelta(minutes=2 * t)).isoformat(),
                        "text": text,
                    }
                )
                n_turns += 1
                if fid:
                    evidence[fid] = turn_id
        asked = day + timedelta(days=10)
        for fid, questions in QUESTIONS.items():
            if fid not in FACTS[conv]:
                continue
            for j, (qtype, text) in enumerate(questions):
                lines.append(
                    {
                        "kind": "question",
                        "conversation": conv,
                        "id": f"{fid}-q{j + 1}",
                        "type": qtype,
                        "text": text,
                        "evidence": [evidence[fid]],
                        "asked_at": asked.isoformat(),
                    }
                )
                n_questions += 1
    meta = {
        "kind": "meta",
        "name": "veil-long-memory",
        "version": 1,
        "licence": "written for the Veil project (Apache-2.0, like the repository); "
        "no third-party text",
        "conversations": len(PAIRS),
        "sessions": len(PAIRS) * SESSIONS,
        "turns": n_turns,
        "questions": n_questions,
    }
    return [meta, *lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    lines = compose()
    args.out.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    print(json.dumps(lines[0]))


if __name__ == "__main__":
    main()
