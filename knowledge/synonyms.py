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
from collections.abc import Sequence

import numpy as np

MIN_DOCS = 5  # a prose word must occur in this many documents to be judged
MIN_SHARED_DOCS = 3  # ...and the linked symptom word must be listed by this many of them
MIN_LIFT = 5.0  # P(listed | documents using the word) / P(listed in the library)
MAX_LINKS = 3


class SymptomLinks:
    """Prose word -> the symptom-list words that are its variants, computed on first use per word."""

    def __init__(self, symptom_lists: Sequence[Sequence[str]]) -> None:
        terms: dict[str, int] = {}
        flat: list[int] = []
        indptr = [0]
        for listed in symptom_lists:
            flat.extend(terms.setdefault(t, len(terms)) for t in dict.fromkeys(listed))
            indptr.append(len(flat))
        self._terms = list(terms)
        self._flat = np.array(flat, dtype=np.int32)  # CSR: document -> its symptom-list term ids
        self._indptr = np.array(indptr, dtype=np.int64)
        self._listed = np.bincount(self._flat, minlength=len(self._terms))  # documents listing each term
        self._known = terms
        self._n = max(len(symptom_lists), 1)
        self._cache: dict[str, tuple[str, ...]] = {}

    def links(self, word: str, docs: np.ndarray) -> tuple[str, ...]:
        """Variants of ``word`` among the symptom lists, given the documents that use it (its postings)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        out: tuple[str, ...] = ()
        if len(docs) >= MIN_DOCS and word not in self._known:
            starts, ends = self._indptr[docs], self._indptr[np.asarray(docs) + 1]
            lengths = ends - starts
            # every (document, listed term) pair of these documents, in one gather
            at = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
            counts = np.bincount(self._flat[at], minlength=len(self._terms))
            chars = set(word)
            scored = []
            for tid in np.flatnonzero(counts >= MIN_SHARED_DOCS).tolist():
                term = self._terms[tid]
                share = counts[tid] / len(docs)
                lift = share / (self._listed[tid] / self._n)
                if len(term) >= 2 and lift >= MIN_LIFT and chars & set(term):
                    scored.append((share * math.log(lift), term))
            out = tuple(t for _, t in sorted(scored, reverse=True)[:MAX_LINKS])
        if len(self._cache) < 100_000:
            self._cache[word] = out
        return out
