"""Synonym links from the library itself: a word its documents write only in prose, tied to the symptom-list
words those same documents list (流涕 -> 流鼻涕, 泄泻 -> 腹泻).

The symptom lists and the prose of one document describe the same disease in two vocabularies. For a word
no symptom list uses, the symptom-list words that are far more common among the documents using it than in
the library at large (lift), and that share a character with it, are its spelling or wording variants. The
character test keeps the links to variants (流涕 / 流鼻涕) and drops mere companions (流涕 -> 鼻塞, 咽痛),
which moved rankings to common neighbours. No evaluation label or query is read.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

MIN_DOCS = 5  # a prose word must occur in this many documents to be judged
MIN_SHARED_DOCS = 3  # ...and the linked symptom word must be listed by this many of them
MIN_LIFT = 5.0  # P(listed | documents using the word) / P(listed in the library)
MAX_LINKS = 3


class SymptomLinks:
    """Prose word -> the symptom-list words that are its variants, computed on first use per word."""

    def __init__(self, symptom_lists: Sequence[Sequence[str]]) -> None:
        self._lists = [frozenset(s) for s in symptom_lists]
        self._listed = Counter(t for s in self._lists for t in s)
        self._n = max(len(self._lists), 1)
        self._cache: dict[str, tuple[str, ...]] = {}

    def links(self, word: str, docs: np.ndarray) -> tuple[str, ...]:
        """Variants of ``word`` among the symptom lists, given the documents that use it (its postings)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        out: tuple[str, ...] = ()
        if len(docs) >= MIN_DOCS and word not in self._listed:
            chars = set(word)
            counts = Counter(t for d in docs.tolist() for t in self._lists[d] if len(t) >= 2 and chars & set(t))
            scored = []
            for term, k in counts.items():
                share = k / len(docs)
                lift = share / (self._listed[term] / self._n)
                if k >= MIN_SHARED_DOCS and lift >= MIN_LIFT:
                    scored.append((share * math.log(lift), term))
            out = tuple(t for _, t in sorted(scored, reverse=True)[:MAX_LINKS])
        if len(self._cache) < 100_000:
            self._cache[word] = out
        return out
