"""What recall embeds of a query: the query without the words its scope is full of.

Pure (the memory actor and the benchmarks use it; `MemoryIndex.semantic_query` finds
the words). A word that half or more of the searched memories hold tells none of
them apart: BM25 already gives it next to no weight (IDF), but an embedding has no
IDF, and such a word pulls the query towards every memory that holds it and says
little else. In a transcript of named people every item begins with a speaker's
name, so "What new career direction was Jonah considering?" was nearest to
"Jonah: Have to run, bye for now!" (cosine 0.63) and far from the answer (0.41);
embedded without "Jonah", the question finds what it asks about
(bench/long_memory_eval.py). The keyword side still reads the whole query.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection

__all__ = ["COMMON_LEAST", "COMMON_SHARE", "without_words"]

#: A query word held by at least this share of the searched memories is left out of
#: what recall embeds...
COMMON_SHARE = 0.5
#: ...once the searched scopes have received this many memories: in fewer, a share says
#: little, and recall returns most of them anyway.
COMMON_LEAST = 50

# A word as `actors.search.hybrid.fts_terms` reads one, with an English possessive.
_WORD = re.compile(r"([^\W_]+)(['’]s(?![^\W_]))?")
_SPACES = re.compile(r"[ \t]+")
_BEFORE_PUNCTUATION = re.compile(r"[ \t]+([?!.,;:])")


def _fold(word: str) -> str:
    """A word as FTS5's unicode61 tokenizer (remove_diacritics 2) indexes it."""
    folded = unicodedata.normalize("NFKD", word.lower())
    return "".join(ch for ch in folded if not unicodedata.combining(ch))


def without_words(text: str, words: Collection[str]) -> str:
    """`text` less these words (folded as `fts_terms` folds them, with their possessive
    's), spaces tidied; `text` itself when nothing else would be left."""
    if not words:
        return text
    kept = _WORD.sub(lambda m: "" if _fold(m.group(1)) in words else m.group(0), text)
    kept = _BEFORE_PUNCTUATION.sub(r"\1", _SPACES.sub(" ", kept)).strip()
    if not any(ch.isalnum() for ch in kept):
        return text
    return kept
