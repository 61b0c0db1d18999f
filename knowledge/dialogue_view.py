"""A second view of each disease from real patients' words: questions from dialogue data, weakly labelled
with the library disease their answer names.

Where a doctor's answer (or the question's title, or the question's own hedge "是不是X") names a library
disease (name or alias, longest match, not negated, not an entry named after a bare symptom), the question
is a patient's own description of that disease. From those labels, built deterministically: a "patients'
words" field per disease, the search words of its questions (the search's own query processing, plus the
everyday words the library never uses, so 没劲儿 or 肚子痛 reach the diseases whose patients say them), which
`Retriever.search` scores with BM25 against the complaint. The
question count per disease is kept too (`counts`, printed by `python -m knowledge dialogues`); as a
commonness prior it lowered the adult probe at every weight tried (docs/retrieval.md), so it is not used.

The questions are split by a stable hash of their text: one in `DEV_MOD` is held out ("dialogue lay" eval
set, `python -m knowledge eval --data <dialogues folder>`) and never enters the view.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ahocorasick
import bm25s
import numpy as np

from knowledge.index import _progress, library_hash
from knowledge.text import DATA_DIR, normalise

if TYPE_CHECKING:
    from knowledge.index import LibraryIndex
    from knowledge.search import Retriever

log = logging.getLogger(__name__)

VIEW_VERSION = 2  # bump when the labelling, the split or the stored layout changes
DEV_MOD = 5  # a question whose text hash is 0 mod DEV_MOD is held out: 20%
# BM25 of the patients' words field. b = 1: a field's length is how many patients asked (1 to 1,400
# questions), not verbosity, so it is normalised fully; the words' share among a disease's patients counts.
VIEW_K1, VIEW_B = 1.5, 1.0
# A mention is negated when its clause says so just before it (不是胃炎, 排除肺炎, 没有高血压).
NEGATION_BEFORE = ("不是", "不像", "不会是", "不属于", "并非", "并不是", "排除", "除外", "没有", "无", "否认", "未见",
                   "不考虑", "不用担心", "不必担心", "非")
NEGATION_WINDOW = 6  # characters before the mention that are searched for those words
_QUESTION_FORMS = re.compile(r"是不是|会不会|是否|有没有")  # 是不是胃炎 asks; it does not deny
_CLAUSE_END = re.compile(r"[，,。.；;！!？?\n]")
# The question's own guess, which names the disease it is about (是不是胃炎, 会不会是肺炎, 是否患有…).
_HEDGE = re.compile(r"(?:是不是|是否是|是否有|是否患有|会不会是|会是|难道是|可能是|怀疑是|得了|患了|患有)$")
# An answer's diagnosis (你可能患有X, 考虑为X, 诊断为X) outweighs the diseases it mentions in passing.
_DIAGNOSIS = re.compile(r"(?:可能患有|可能患了|可能是|可能有|可能得了|考虑是|考虑为|考虑|诊断为|诊断是|属于|"
                        r"患有|得了|应该是|一般是|多是|多为|就是)$")
W_DIAGNOSIS = 3  # a mention after a diagnosis phrase counts 1 + this
W_TITLE = 3  # a mention in the question's title (CMD: the patient's own subject line)
W_HEDGE = 2  # a disease the question offers as its guess


@dataclass(frozen=True)
class Labelled:
    """One question and the library row its dialogue is about."""

    question: str
    row: int
    source: str

    @property
    def held_out(self) -> bool:
        return is_held_out(self.question)


def is_held_out(question: str) -> bool:
    """Stable 80/20 split on the question text (sha256, not Python's salted hash)."""
    digest = hashlib.sha256(normalise(question.strip()).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % DEV_MOD == 0


def dialogue_files(folder: Path) -> list[Path]:
    """The JSONL files of a dialogues folder (the raw CSV copy of one of them is not read)."""
    return sorted(p for p in Path(folder).glob("*.jsonl") if p.is_file())


# The modules whose code decides a question's label and its search words: their source is in the key.
_CODE = ("dialogue_view.py", "search.py", "text.py", "synonyms.py")


def dialogues_hash(folder: Path) -> str:
    """Content hash of the dialogue files, their names, the code version, the source of the modules that
    label and process the questions, the default search settings (the view is built with them) and the
    word lists the query processing reads (lay terms, body parts…): any change rebuilds the view."""
    from knowledge.search import SearchSettings

    h = hashlib.sha256(f"view{VIEW_VERSION}:{DEV_MOD}:{VIEW_K1}:{VIEW_B}".encode())
    h.update(json.dumps(dataclasses.asdict(SearchSettings()), sort_keys=True).encode())
    here = Path(__file__).resolve().parent
    for name in _CODE:
        h.update(name.encode() + (here / name).read_bytes())
    for p in dialogue_files(folder):
        h.update(p.name.encode() + library_hash(p).encode())  # the same content hash as the library's
    for p in sorted(DATA_DIR.glob("*.json")) + sorted(DATA_DIR.glob("*.txt")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def read_dialogues(folder: Path) -> Iterator[dict[str, str]]:
    """Records with a question and an answer (title when the file has one), file by file in name order.
    Lines that are not UTF-8 JSON (a GBK export, a cut line) are skipped, with one warning per file."""
    for p in dialogue_files(folder):
        skipped = 0
        with p.open("rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except ValueError:  # UnicodeDecodeError is a ValueError
                    skipped += raw.strip() != b""
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("question"), str) and isinstance(
                        rec.get("answer"), str):
                    yield {"question": rec["question"], "answer": rec["answer"],
                           "title": rec.get("title") if isinstance(rec.get("title"), str) else "",
                           "source": p.stem}
        if skipped:
            log.warning("%s: %d lines skipped (not UTF-8 JSON)", p, skipped)


class NameMatcher:
    """Library disease names and aliases found in a text: longest match, left to right, not negated."""

    def __init__(self, name_rows: dict[str, list[int]], names: Sequence[str], symptom_entry: Sequence[bool]) -> None:
        self._automaton = ahocorasick.Automaton()
        self._row: dict[str, int | None] = {}
        for name, rows in name_rows.items():
            # A name several documents share goes to the one whose own name it is (else the first).
            own = [r for r in rows if normalise(names[r].strip()) == name]
            row = (own or rows)[0]
            # An entry named after a bare symptom (发烧) still takes its span, so that span labels nothing.
            self._row[name] = None if symptom_entry[row] else row
            self._automaton.add_word(name, name)
        if name_rows:
            self._automaton.make_automaton()
        self._empty = not name_rows

    def mentions(self, text: str) -> list[tuple[int, int]]:
        """(start, row) of each non-negated disease mention, longest match first at each place."""
        if self._empty:
            return []
        text = normalise(text)
        spans = sorted(((end - len(w) + 1, -len(w), w) for end, w in self._automaton.iter(text)))
        out: list[tuple[int, int]] = []
        covered = 0
        for start, neg_len, word in spans:
            if start < covered:
                continue  # inside a longer name already taken
            covered = start - neg_len
            row = self._row[word]
            if row is not None and not _negated(text, start):
                out.append((start, row))
        return out

    def after(self, text: str, cue: re.Pattern[str]) -> list[tuple[int, int, bool]]:
        """Mentions with whether the cue phrase ends right before each (是不是胃炎, 可能患有胃炎)."""
        t = normalise(text)
        return [(s, r, bool(cue.search(t[max(0, s - 5):s]))) for s, r in self.mentions(t)]


def _negated(text: str, start: int) -> bool:
    clause_start = max((m.end() for m in _CLAUSE_END.finditer(text, 0, start)), default=0)
    window = _QUESTION_FORMS.sub("|", text[max(clause_start, start - NEGATION_WINDOW):start])
    return any(w in window for w in NEGATION_BEFORE)


def label(record: dict[str, str], matcher: NameMatcher) -> int | None:
    """The library row a dialogue is about: the disease with the most weight from its answer's mentions
    (a diagnosis phrase before one adds `W_DIAGNOSIS`), its title (`W_TITLE` each) and the question's own
    guesses (`W_HEDGE`); ties go to the one named first in the answer. None when nothing is named."""
    counts: Counter[int] = Counter()
    first: dict[int, int] = {}
    for start, row, diagnosed in matcher.after(record["answer"], _DIAGNOSIS):
        counts[row] += 1 + W_DIAGNOSIS * diagnosed
        first.setdefault(row, start)
    for start, row in matcher.mentions(record.get("title", "")):
        counts[row] += W_TITLE
        first.setdefault(row, 1_000_000 + start)
    for start, row, hedge in matcher.after(record["question"], _HEDGE):
        if hedge:
            counts[row] += W_HEDGE
            first.setdefault(row, 2_000_000 + start)
    if not counts:
        return None
    return min(counts, key=lambda r: (-counts[r], first[r]))


def view_terms(retriever: Retriever, text: str) -> dict[str, float]:
    """Search words of a text for the view: the search's own weighted words, plus the current turn's
    content words the generic-word filter drops for the library (everyday words no document uses)."""
    weights, current, _ = retriever._query(text, ())
    return retriever._view_weights(weights, current)


class DialogueView:
    """Per-row training question counts (printed, not scored) and a BM25 field over each row's patients'
    words."""

    def __init__(self, counts: np.ndarray, model: bm25s.BM25 | None, doc_rows: np.ndarray,
                 dev: list[dict[str, str]], key: str = "") -> None:
        self.counts = counts  # training questions per library row
        self.model = model  # BM25 over the rows that have questions (doc i = row doc_rows[i])
        self.doc_rows = doc_rows
        self.dev = dev  # held-out {query, label_disease, source}
        self.key = key
        self.folder: Path | None = None  # the dialogues folder it was built from (set by load_or_build)

    @classmethod
    def build(cls, index: LibraryIndex, folder: Path, progress: bool = True) -> DialogueView:
        from knowledge.search import Retriever

        base = Retriever(index)  # default query settings: the view does not depend on tuning
        matcher = NameMatcher(base._name_rows, base.index.meta.names, base._symptom_entry.tolist())
        records = list(read_dialogues(folder))
        labelled: list[Labelled] = []
        bar = _progress(len(records), "labelling dialogues", progress)
        for rec in records:
            row = label(rec, matcher)
            if row is not None:
                labelled.append(Labelled(rec["question"], row, rec["source"]))
            bar.update()
        bar.close()
        train = [x for x in dict.fromkeys(labelled) if not x.held_out]
        counts = np.bincount([x.row for x in train], minlength=base.size).astype(np.int32)
        words: dict[int, list[str]] = {}
        bar = _progress(len(train), "patients' words", progress)
        for x in train:
            words.setdefault(x.row, []).extend(view_terms(base, x.question))
            bar.update()
        bar.close()
        doc_rows = np.array(sorted(words), dtype=np.int32)
        model = None
        if len(doc_rows):
            model = bm25s.BM25(k1=VIEW_K1, b=VIEW_B, method="robertson")
            model.index([words[int(r)] for r in doc_rows], show_progress=False)
        names = base.index.meta.names
        dev = [{"query": x.question, "label_disease": names[x.row], "source": x.source}
               for x in dict.fromkeys(labelled) if x.held_out]
        return cls(counts, model, doc_rows, dev)

    def save(self, directory: Path) -> None:
        tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.savez(tmp / "view.npz", counts=self.counts, doc_rows=self.doc_rows)
        if self.model is not None:
            self.model.save(tmp / "words", show_progress=False)
        (tmp / "dev.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in self.dev),
                                       encoding="utf-8")
        shutil.rmtree(directory, ignore_errors=True)
        try:
            tmp.rename(directory)  # atomic publish, as the index
        except OSError:
            # Another process published the same key between the rmtree and the rename: keep its copy.
            shutil.rmtree(tmp, ignore_errors=True)
            if not (directory / "view.npz").is_file():
                raise

    @classmethod
    def load(cls, directory: Path) -> DialogueView:
        with np.load(directory / "view.npz") as arrays:
            counts, doc_rows = arrays["counts"], arrays["doc_rows"]
        model = bm25s.BM25.load(directory / "words", show_progress=False) if (directory / "words").is_dir() else None
        dev = [json.loads(x) for x in (directory / "dev.jsonl").read_text(encoding="utf-8").splitlines() if x]
        return cls(counts, model, doc_rows, dev)

    @classmethod
    def load_or_build(cls, index: LibraryIndex, folder: Path, cache_dir: Path, progress: bool = True,
                      rebuild: bool = False) -> DialogueView:
        """The view of `folder` for the index's library, cached beside the index: keyed by the index
        (library hash + index key) and `dialogues_hash`. FileNotFoundError when `folder` has no dialogue
        files (an empty view would silently change nothing)."""
        if not dialogue_files(folder):
            raise FileNotFoundError(f"no dialogue files (*.jsonl) in {folder}")
        # The index's cache folder name is <stem>-<library hash>-<index settings key>; the same otherwise.
        index_key = index.directory.name if index.directory is not None else (
            f"{index.library_path.stem}-{library_hash(index.library_path)}-{index.settings.key()}")
        key = f"{index_key}-{dialogues_hash(folder)}"
        directory = Path(cache_dir) / f"dialogues-{key}"
        if not rebuild and (directory / "view.npz").is_file():
            try:
                view = cls.load(directory)
                view.key, view.folder = key, folder
                return view
            except (OSError, ValueError, KeyError, EOFError):
                pass  # a damaged cache is rebuilt below
        start = time.perf_counter()
        view = cls.build(index, folder, progress)
        view.save(directory)
        view.key, view.folder = key, folder
        if progress:
            print(f"dialogue view built in {time.perf_counter() - start:.1f}s -> {directory}")
        return view

    def word_scores(self, weights: dict[str, float], size: int) -> np.ndarray:
        """BM25 of the complaint's words against each row's patients' words (0 for rows without any)."""
        out = np.zeros(size)
        if self.model is None:
            return out
        vocab, sc = self.model.vocab_dict, self.model.scores
        indptr, indices, data = sc["indptr"], sc["indices"], sc["data"]
        idx: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        for term, w in weights.items():
            tid = vocab.get(term)
            if tid is None or w <= 0:
                continue
            a, b = indptr[tid], indptr[tid + 1]
            idx.append(indices[a:b])
            vals.append(data[a:b] * w)
        if idx:
            out[self.doc_rows] = np.bincount(np.concatenate(idx), weights=np.concatenate(vals),
                                             minlength=len(self.doc_rows))
        return out

    def summary(self, names: Sequence[str]) -> str:
        top = np.argsort(-self.counts, kind="stable")[:10]
        common = ", ".join(f"{names[r]} {self.counts[r]}" for r in top if self.counts[r])
        return (f"{int(self.counts.sum())} training questions for {int((self.counts > 0).sum())} diseases, "
                f"{len(self.dev)} held out; most asked about: {common}")


def default_folder(library_path: Path) -> Path | None:
    """A `dialogues/` folder beside the library file, when there is one with dialogue files."""
    folder = Path(library_path).resolve().parent / "dialogues"
    return folder if folder.is_dir() and dialogue_files(folder) else None


def lay_dev_cases(view: DialogueView, names: Sequence[str], aliases: Sequence[Sequence[str]]) -> list[dict[str, str]]:
    """The held-out questions that do not name their disease (a patient's own description; a question
    that names it tests the name evidence instead)."""
    names_of: dict[str, list[str]] = {}
    for name, als in zip(names, aliases, strict=True):
        names_of.setdefault(name, []).extend(normalise(n) for n in (name, *als) if len(n) >= 2)
    return [case for case in view.dev
            if not any(n in normalise(case["query"]) for n in names_of.get(case["label_disease"], ()))]
