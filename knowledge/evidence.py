"""Per-word evidence for the fielded search, precomputed for the whole vocabulary with the index.

The name/aliases, symptom and prose BM25 indexes each have their own posting lists. The search needs,
for every query word, the documents using it with (a) the weighted sum of the three fields' BM25
scores and (b) whether a symptom list names it (for symptom coverage). Every name, symptom and prose
token is also in the "all" field, so each field's postings are a subset of the "all" postings: the
three fields are aligned on the "all" posting lists once when the index is built (saved with it), the
field weights are applied at load (vectorised, a few ms), and a query word's evidence is then three array
views: no per-word work at query time and no first-query penalty for words not seen before.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import bm25s
import numpy as np


@dataclass(frozen=True)
class EvidenceWeights:
    w_name: float
    w_symptoms: float
    w_prose: float
    name_symptom_df: float  # a word listed as a symptom of many diseases says little via a name
    coverage_symptom_share: float  # a symptom-list mention counts this much of coverage, prose the rest


@dataclass
class QueryEvidence:
    """Per document, for one weighted query: fielded BM25; symptom coverage (the IDF-weighted share of
    the query's symptom words the document mentions); how many of those words it mentions; and how many
    symptom words the query has."""

    bm25: np.ndarray
    coverage: np.ndarray
    symptom_hits: np.ndarray
    n_symptom_words: int


@dataclass(frozen=True)
class AlignedFields:
    """The name, symptom and prose BM25 scores laid out on the 'all' posting lists (0 where a document
    does not use the word in that field), whether a symptom list names it, and each word's symptom-list
    document frequency. Built with the index and cached with it."""

    name: np.ndarray  # float32, one per 'all' posting
    symptoms: np.ndarray
    prose: np.ndarray
    in_symptoms: np.ndarray  # bool
    symptom_df: np.ndarray  # int32, one per 'all' word

    @classmethod
    def build(cls, indexes: dict[str, bm25s.BM25], n_docs: int) -> AlignedFields:
        base = indexes["all"]
        indptr = np.asarray(base.scores["indptr"], dtype=np.int64)
        df = np.diff(indptr)
        n_words = len(df)
        keys = np.repeat(np.arange(n_words, dtype=np.int64), df) * n_docs + base.scores["indices"]
        # keys are sorted: words in id order, documents ascending within a word
        parts = {name: _align(indexes[name], base.vocab_dict, keys, n_words, n_docs)
                 for name in ("name", "symptoms", "prose")}
        return cls(parts["name"][0], parts["symptoms"][0], parts["prose"][0], parts["symptoms"][1],
                   parts["symptoms"][2])

    def save(self, path: Path) -> None:
        np.savez(path, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: Path) -> AlignedFields:
        with np.load(path) as data:
            return cls(**{f.name: data[f.name] for f in fields(cls)})


class EvidenceTable:
    """Weighted evidence of every word in the 'all' vocabulary (CSR over words, as the 'all' index)."""

    def __init__(self, base: bm25s.BM25, aligned: AlignedFields, n_docs: int, weights: EvidenceWeights) -> None:
        self._vocab: dict[str, int] = base.vocab_dict
        indptr = np.asarray(base.scores["indptr"], dtype=np.int64)
        self._n_docs = n_docs
        self._rows = base.scores["indices"]
        df = np.diff(indptr)
        word_of_entry = np.repeat(np.arange(len(df), dtype=np.int64), df)
        w = weights
        w_name = w.w_name / (1 + aligned.symptom_df / w.name_symptom_df)  # per word
        self._bm25 = (aligned.name * w_name[word_of_entry] + aligned.symptoms.astype(np.float64) * w.w_symptoms
                      + aligned.prose.astype(np.float64) * w.w_prose)
        is_symptom_word = aligned.symptom_df > 0
        share = w.coverage_symptom_share
        self._coverage = np.where(is_symptom_word[word_of_entry], (1 - share) + share * aligned.in_symptoms, 0.0)
        # Per word, as Python lists: a query reads a handful of scalars, faster from a list than numpy.
        self._span = list(zip(indptr[:-1].tolist(), indptr[1:].tolist(), strict=True))
        self._idf = np.where(is_symptom_word, np.log(1 + n_docs / (1 + df)), 0.0).tolist()

    def score(self, weights: dict[str, float]) -> QueryEvidence:
        """Scores of every document for weighted query words (one gather and three bincounts)."""
        starts, ends, ws, cws, symptom = [], [], [], [], []
        total = 0.0
        for word, w in weights.items():
            wid = self._vocab.get(word)
            if wid is None or wid >= len(self._span) or not w:
                continue
            a, b = self._span[wid]
            if a == b:
                continue
            idf = self._idf[wid]
            starts.append(a)
            ends.append(b)
            ws.append(w)
            cws.append(w * idf)
            symptom.append(1.0 if idf else 0.0)
            total += w * idf
        n = self._n_docs
        if not starts:
            return QueryEvidence(np.zeros(n), np.zeros(n), np.zeros(n), 0)
        lengths = np.subtract(ends, starts)
        at = np.concatenate([self._rows[a:b] for a, b in zip(starts, ends, strict=True)])
        bm = np.concatenate([self._bm25[a:b] for a, b in zip(starts, ends, strict=True)])
        bm25 = np.bincount(at, weights=bm * np.repeat(ws, lengths), minlength=n)
        if not total:
            return QueryEvidence(bm25, np.zeros(n), np.zeros(n), 0)
        cov = np.concatenate([self._coverage[a:b] for a, b in zip(starts, ends, strict=True)])
        coverage = np.bincount(at, weights=cov * np.repeat(cws, lengths), minlength=n) / total
        hits = np.bincount(at, weights=np.repeat(symptom, lengths), minlength=n)
        return QueryEvidence(bm25, coverage, hits, int(sum(symptom)))


def _align(model: bm25s.BM25, vocab: dict[str, int], keys: np.ndarray, n_words: int,
           n_docs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One field's BM25 scores and presence laid out on the 'all' postings, and its document frequency
    per 'all' word."""
    indptr = np.asarray(model.scores["indptr"], dtype=np.int64)
    to_base = np.full(len(indptr) - 1, -1, dtype=np.int64)
    for word, i in model.vocab_dict.items():
        base = vocab.get(word, -1)
        if i < len(to_base) and base < n_words:  # bm25s may list "" past the last posting list
            to_base[i] = base
    df = np.diff(indptr)
    field_keys = np.repeat(to_base, df) * n_docs + model.scores["indices"]
    at = np.minimum(np.searchsorted(keys, field_keys), len(keys) - 1)
    # Every real token is in the 'all' field too; what is not is the "" placeholder of an empty field.
    found = keys[at] == field_keys
    at = at[found]
    scores = np.zeros(len(keys), dtype=np.float32)
    scores[at] = model.scores["data"][found]
    present = np.zeros(len(keys), dtype=bool)
    present[at] = True
    field_df = np.zeros(n_words, dtype=np.int32)
    field_df[to_base[to_base >= 0]] = df[to_base >= 0]
    return scores, present, field_df
