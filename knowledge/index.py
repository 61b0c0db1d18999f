"""BM25 indexes over the disease library (one per field), built once and cached on disk.

The cache key is a hash of the library file's bytes and of every setting that changes the index, so a
new library or new settings never reuse a stale index. Documents are not kept in memory: the index
holds byte offsets into the library and parses a document when it is asked for.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bm25s
import numpy as np
from tqdm import tqdm

from knowledge.evidence import AlignedFields
from knowledge.schema import Disease, LibraryError, load_library
from knowledge.text import DATA_DIR, TextProcessor, clean_term, cue_words, normalise

INDEX_VERSION = 12  # bump when the on-disk layout or the tokenisation code changes
FIELDS = ("name", "symptoms", "prose", "all")  # "all" is the plain-BM25 single field
# Word lists that change document tokens or flags (lay_terms.json is query-side only).
INDEX_DATA_FILES = ("stopwords.txt", "generic_words.txt", "cue_words.json")


@dataclass(frozen=True)
class IndexSettings:
    """Everything that changes what is stored in the index (part of the cache key)."""

    k1: float = 1.5
    b: float = 0.75
    user_word_freq: int = 2000
    prose_fields: tuple[str, ...] = ("description", "diagnosis")
    all_fields: tuple[str, ...] = ("name", "aliases", "description", "symptoms", "diagnosis")

    def key(self) -> str:
        data_files = [DATA_DIR / n for n in INDEX_DATA_FILES]
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        h.update(str(INDEX_VERSION).encode())
        for p in data_files:  # stopwords etc. change tokens, so they change the index
            h.update(p.name.encode() + p.read_bytes())
        return h.hexdigest()[:16]


def library_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


# Rates written per 1,000 / 10,000 / 100,000 / 1,000,000 -> percent.
_RATE_PATTERNS = (
    (re.compile(r"(\d+(?:\.\d+)?)\s*%"), 1.0),
    (re.compile(r"(\d+(?:\.\d+)?)\s*‰"), 0.1),
    (re.compile(r"(\d+(?:\.\d+)?)\s*/\s*10\s*万"), 1e-3),
    (re.compile(r"(\d+(?:\.\d+)?)\s*/\s*100\s*万"), 1e-4),
    (re.compile(r"(\d+(?:\.\d+)?)\s*/\s*万"), 1e-2),
    (re.compile(r"万分之\s*(\d+(?:\.\d+)?)"), 1e-2),
)


def parse_prevalence(text: str) -> float | None:
    """'0.001%-0.005%' -> 0.005, '0.1％以下' -> 0.1, '31/10万' -> 0.031, '4‰' -> 0.4 (percent); None when
    no rate is given."""
    text = normalise(text or "")  # full-width ％ becomes %
    values = [float(v) * scale for pattern, scale in _RATE_PATTERNS for v in pattern.findall(text)]
    return max(values) if values else None


@dataclass
class DocMeta:
    """What search needs per document, without the long texts."""

    ids: list[str]
    names: list[str]
    aliases: list[list[str]]
    symptoms: list[list[str]]
    offsets: list[int]
    child: np.ndarray  # bool: a paediatric disease (department, susceptible people or name)
    child_only: np.ndarray  # bool: named as a paediatric/neonatal disease
    female: np.ndarray
    male: np.ndarray
    elderly: np.ndarray
    adult_only: np.ndarray  # bool: says it affects adults / the elderly / pregnant women, not children
    prevalence: np.ndarray  # percent; NaN when unknown
    mentions: np.ndarray  # how many other documents list this disease among their complications
    n_symptom_terms: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _doc_flags(d: Disease) -> tuple[bool, bool, bool, bool, bool, bool]:
    cues = cue_words()
    dept = "".join(d.department)
    people = d.susceptible_people
    child_only = any(d.name.startswith(p) for p in cues["age_prefixes"])
    child = child_only or any(m in dept for m in cues["child_departments"]) or any(
        m in people for m in cues["child_people"])
    female = any(m in dept or m in people for m in cues["female_markers"])
    male = any(m in dept or m in people for m in cues["male_markers"])
    elderly = any(m in people for m in cues["elderly_markers"])
    adult_only = not child and (any(m in people for m in cues["adult_markers"]) or female or male or elderly)
    return child, child_only, female, male, elderly, adult_only


def complication_mentions(diseases: list[Disease]) -> np.ndarray:
    """Library-internal commonness: for each disease, the number of OTHER documents that list its name or
    one of its aliases among their complications. Common conditions (infections, anaemia, heart failure)
    are the ones many other diseases lead to, whatever the (often missing or odd) prevalence string says."""
    listed: dict[str, set[int]] = {}
    for i, d in enumerate(diseases):
        for c in d.complications:
            key = normalise(c.strip())
            if key:
                listed.setdefault(key, set()).add(i)
    out = np.zeros(len(diseases), dtype=np.int32)
    for i, d in enumerate(diseases):
        docs: set[int] = set()
        for n in {normalise(x.strip()) for x in (d.name, *d.aliases)}:
            docs |= listed.get(n, set())
        docs.discard(i)
        out[i] = len(docs)
    return out


def _field_texts(d: Disease, settings: IndexSettings) -> dict[str, str]:
    names = " ".join([d.name, *d.aliases])
    return {
        "name": names,
        "symptoms": " ".join(d.symptoms),
        "prose": "\n".join(d.section(f) for f in settings.prose_fields),
    }


class _LogLines:
    """Progress for a log: a plain line every few seconds (a tqdm bar off a terminal writes a carriage-
    return line per refresh, hundreds of them in a log file)."""

    def __init__(self, total: int, desc: str, every_s: float = 5.0) -> None:
        self.total, self.desc, self.every_s = total, desc, every_s
        self.done = 0
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            print(f"{self.desc}: {self.done}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(f"{self.desc}: {self.done}/{self.total} in {time.monotonic() - self._start:.1f}s",
              file=sys.stderr, flush=True)


def _progress(total: int, desc: str, enabled: bool) -> tqdm | _LogLines:
    if enabled and not sys.stderr.isatty():
        return _LogLines(total, desc)
    return tqdm(total=total, desc=desc, unit="doc", disable=not enabled)


# Worker state for the parallel tokeniser (set by fork; one TextProcessor per process).
_WORKER: TextProcessor | None = None


def _tokenise_doc(texts: dict[str, str]) -> dict[str, list[str]]:
    assert _WORKER is not None
    return {f: _WORKER.doc_tokens(t) for f, t in texts.items()}


def _tokenise_all(proc: TextProcessor, docs: list[dict[str, str]], progress: bool) -> list[dict[str, list[str]]]:
    global _WORKER
    _WORKER = proc
    proc.cut("预热")  # build the prefix dictionary before forking, once
    bar = _progress(len(docs), "tokenising library", progress)
    workers = min(os.cpu_count() or 1, 8)
    try:
        if workers > 1 and len(docs) > 500 and "fork" in mp.get_all_start_methods():
            with mp.get_context("fork").Pool(workers) as pool:
                out = []
                for res in pool.imap(_tokenise_doc, docs, chunksize=64):
                    out.append(res)
                    bar.update()
                return out
        out = []
        for texts in docs:
            out.append(_tokenise_doc(texts))
            bar.update()
        return out
    finally:
        bar.close()


class LibraryIndex:
    """Per-field bm25s indexes plus document metadata, saved under cache_dir/<key>/."""

    def __init__(self, library_path: Path, settings: IndexSettings, text: TextProcessor,
                 fields: dict[str, bm25s.BM25], meta: DocMeta, aligned: AlignedFields | None = None) -> None:
        self.library_path = library_path
        self.settings = settings
        self.text = text
        self.fields = fields
        self.meta = meta
        # The per-field scores aligned on the 'all' postings (knowledge/evidence.py), built once.
        self.aligned = aligned or AlignedFields.build(fields, len(meta.ids))
        self._docs: dict[int, Disease] = {}
        self._row = {doc_id: i for i, doc_id in enumerate(meta.ids)}
        self._all_tokens: list[list[str]] | None = None  # set by build(); kept on disk for benchmarks
        self.directory: Path | None = None

    # -- documents --------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.meta.ids)

    def row(self, disease_id: str) -> int:
        return self._row[disease_id]

    def doc(self, row: int) -> Disease:
        """The document at a row, parsed from the library on first use."""
        cached = self._docs.get(row)
        if cached is None:
            with self.library_path.open("rb") as fh:
                fh.seek(self.meta.offsets[row])
                cached = Disease.model_validate(json.loads(fh.readline()))
            self._docs[row] = cached
        return cached

    # -- build / save / load ----------------------------------------------------------------------
    @classmethod
    def build(cls, library_path: Path, settings: IndexSettings, progress: bool = True) -> LibraryIndex:
        report = load_library(library_path)
        diseases = report.diseases
        offsets = _valid_offsets(library_path, {d.id for d in diseases})
        words = set()
        for d in diseases:  # names, aliases and symptom terms kept whole by jieba
            words.update([d.name, *d.aliases, *d.symptoms])
        proc = TextProcessor(words, freq=settings.user_word_freq)
        texts = [_field_texts(d, settings) for d in diseases]
        tokens = _tokenise_all(proc, texts, progress)
        for tok in tokens:
            tok["all"] = tok["name"] + tok["symptoms"] + tok["prose"]
        fields = {}
        for f in FIELDS:
            model = bm25s.BM25(k1=settings.k1, b=settings.b, method="robertson")
            model.index([t[f] or [""] for t in tokens], show_progress=False)
            fields[f] = model
        flags = np.array([_doc_flags(d) for d in diseases], dtype=bool).reshape(-1, 6)
        prev = [parse_prevalence(d.prevalence) for d in diseases]
        meta = DocMeta(
            ids=[d.id for d in diseases], names=[d.name for d in diseases],
            aliases=[list(d.aliases) for d in diseases],
            symptoms=[[s for s in (clean_term(x) for x in d.symptoms) if s] for d in diseases],
            offsets=[offsets[d.id] for d in diseases],
            child=flags[:, 0], child_only=flags[:, 1], female=flags[:, 2], male=flags[:, 3],
            elderly=flags[:, 4], adult_only=flags[:, 5],
            prevalence=np.array([np.nan if p is None else p for p in prev]),
            mentions=complication_mentions(diseases),
        )
        index = cls(library_path, settings, proc, fields, meta)
        index._all_tokens = [t["all"] for t in tokens]
        return index

    def save(self, directory: Path) -> None:
        tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f, model in self.fields.items():
            model.save(tmp / f, show_progress=False)
        m = self.meta
        np.savez(tmp / "flags.npz", child=m.child, child_only=m.child_only, female=m.female, male=m.male,
                 elderly=m.elderly, adult_only=m.adult_only, prevalence=m.prevalence,
                 mentions=m.mentions)
        meta = {"ids": m.ids, "names": m.names, "aliases": m.aliases, "symptoms": m.symptoms,
                "offsets": m.offsets, "library": str(self.library_path), "settings": asdict(self.settings)}
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        self.text.dump_state(tmp / "jieba.pkl")
        self.aligned.save(tmp / "evidence.npz")
        if self._all_tokens is not None:  # the plain-BM25 corpus, so a benchmark can feed rank-bm25 the same
            vocab = self.fields["all"].vocab_dict
            flat = np.array([vocab[t] for doc in self._all_tokens for t in doc], dtype=np.int32)
            np.savez(tmp / "corpus_tokens.npz", ids=flat,
                     lengths=np.array([len(d) for d in self._all_tokens], dtype=np.int32))
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)  # atomic publish: a reader never sees half a cache
        self.directory = directory

    @classmethod
    def load(cls, directory: Path, library_path: Path, settings: IndexSettings) -> LibraryIndex:
        fields = {f: bm25s.BM25.load(directory / f, show_progress=False) for f in FIELDS}
        raw = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        flags = np.load(directory / "flags.npz")
        meta = DocMeta(ids=raw["ids"], names=raw["names"], aliases=raw["aliases"], symptoms=raw["symptoms"],
                       offsets=raw["offsets"], **{k: flags[k] for k in flags.files})
        text = TextProcessor.from_state(directory / "jieba.pkl")
        index = cls(library_path, settings, text, fields, meta, AlignedFields.load(directory / "evidence.npz"))
        index.directory = directory
        return index

    def corpus_tokens(self) -> list[list[str]]:
        """The plain-BM25 ('all' field) tokens of every document, as indexed."""
        if self._all_tokens is None:
            assert self.directory is not None, "index was neither built nor loaded from a cache"
            data = np.load(self.directory / "corpus_tokens.npz")
            inverse = {i: t for t, i in self.fields["all"].vocab_dict.items()}
            words = [inverse[i] for i in data["ids"].tolist()]
            ends = np.cumsum(data["lengths"]).tolist()
            self._all_tokens = [words[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
        return self._all_tokens

    @classmethod
    def load_or_build(cls, library_path: Path, cache_dir: Path, settings: IndexSettings | None = None,
                      progress: bool = True) -> LibraryIndex:
        settings = settings or IndexSettings()
        library_path = Path(library_path).resolve()
        if not library_path.is_file():
            raise LibraryError(f"knowledge library not found: {library_path}")
        directory = Path(cache_dir) / f"{library_path.stem}-{library_hash(library_path)}-{settings.key()}"
        if (directory / "meta.json").is_file():
            try:
                return cls.load(directory, library_path, settings)
            except (OSError, ValueError, KeyError, EOFError):
                pass  # a damaged cache is rebuilt below
        start = time.perf_counter()
        index = cls.build(library_path, settings, progress=progress)
        index.save(directory)
        if progress:
            print(f"index built in {time.perf_counter() - start:.1f}s -> {directory}")
        return index


def _valid_offsets(path: Path, ids: set[str]) -> dict[str, int]:
    """Byte offset of the first line of each kept id (the loader keeps the first duplicate)."""
    out: dict[str, int] = {}
    for offset, line in _lines_with_offsets(path):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        doc_id = rec.get("id") if isinstance(rec, dict) else None
        if doc_id in ids and doc_id not in out:
            try:  # an invalid line may share an id with the valid one the loader kept
                Disease.model_validate(rec)
            except ValueError:
                continue
            out[doc_id] = offset
    return out


def _lines_with_offsets(path: Path) -> Iterator[tuple[int, bytes]]:
    offset = 0
    with path.open("rb") as fh:
        for line in fh:
            yield offset, line
            offset += len(line)
