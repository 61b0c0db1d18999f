"""The retriever: complaint (+ history) -> ranked diseases with the evidence for each.

Ranking = weighted per-field BM25 (name/aliases, symptoms, prose; the three posting lists merged per term
and cached, so one bincount scores a query), plus an IDF-weighted coverage of the patient's symptom words,
plus priors from the library's own fields: prevalence, commonness (how many other documents list the
disease as a complication) and department / susceptible people vs. patient cues (from the text, or from
a structured `PatientContext`: listed symptoms are searched as symptoms, denied ones are removed as the
text's negated words are, a stated age or sex replaces the guessed one). For a patient not identified as
a child, a dialogue view (knowledge/dialogue_view.py), when there is one, adds BM25 of the complaint
against each disease's patients' words; unless a red-flag rule names suspects, the first `fusion_depth`
results are then re-ordered by reciprocal-rank fusion with plain BM25 (and the patients' words ranking).
`mode="plain"` is classic single-field BM25 (equal to rank-bm25 BM25Okapi with
epsilon=0), kept for benchmarks and as a reference.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ahocorasick
import bm25s
import numpy as np

from knowledge.dialogue_view import DialogueView, default_folder
from knowledge.evidence import EvidenceTable, EvidenceWeights
from knowledge.index import IndexSettings, LibraryIndex
from knowledge.patient import PatientContext
from knowledge.schema import Disease
from knowledge.synonyms import SymptomLinks
from knowledge.text import (
    PatientCues,
    QueryTerms,
    clinical_rewrite,
    cue_words,
    decayed,
    is_content,
    lay_terms,
    normalise,
    patient_cues,
    split_compounds,
    strip_age,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchSettings:
    """Query-time weights (not part of the index cache key: they do not change the index)."""

    mode: str = "fielded"  # "fielded" or "plain"
    w_name: float = 1.0
    w_symptoms: float = 1.0
    w_prose: float = 0.35
    subword_weight: float = 0.4  # sub-words of a long term count less than the term itself
    lay_weight: float = 0.8  # clinical word added for a patient's everyday word (发烧 -> 发热)
    generic_ratio: float = 40.0  # drop words far more common in general Chinese than in the library
    name_symptom_df: float = 30.0  # a word listed as a symptom of many diseases says little via a name
    history_decay: float = 0.5  # weight of a turn = decay ** (turns back from the present)
    w_prevalence: float = 0.3  # per decade of prevalence (percent, log10)
    w_mentions: float = 0.25  # per log1p(other documents listing the disease as a complication)
    prevalence_cap: float = 100.0  # percent; "90%" prevalences in scraped libraries are noise, not fact
    default_prevalence: float = 0.005  # the library's median, for documents without one
    mentions_cap: int = 100_000
    w_child_match: float = 0.5  # dxy_dev half a: 0.3 -> 0.5 lifted top-1 27.5% -> 30.8%
    w_child_mismatch: float = 0.12
    w_adult_child_only: float = 0.3
    w_sex_mismatch: float = 0.3
    # Priors for a patient not identified as a child count this much. In children a handful of common
    # infections dominate, so commonness is strong evidence; for anyone else the range of conditions is
    # wide and the library's commonness signals (scraped prevalence strings, complication mentions) must
    # not outvote a specific symptom match. Adult probe (tuned): top-5 51% -> 60%; dxy_dev (children):
    # the 35 complaints without an age word lose ~1 point of top-1, top-5 unchanged.
    prior_scale_without_child: float = 0.5
    w_symptom_entry: float = 0.6  # entries named after a symptom (发烧, 咳嗽) explain nothing
    symptom_entry_df: int = 100  # ...when at least this many documents list that name as a symptom
    scan_weight: float = 0.5  # library symptom words found inside the (rewritten) complaint text
    scan_min_df: int = 2  # ...when at least this many symptom lists use the word
    scan_max_len: int = 6
    w_single: float = 0.2  # penalty for a document that explains one of the patient's >= 2 symptoms only
    w_coverage: float = 0.5  # share of the patient's symptom words the document mentions
    coverage_symptom_share: float = 0.6  # a symptom-list mention counts this much, prose the rest
    # Score gap top-1 minus top-2. dxy_dev half a: top-1 precision 33% overall, 42% at gap>=0.2 (34% of
    # queries), 44% at >=0.3 (13%); never the 60% a fact-like answer needs, so confidence stays rare.
    confident_margin: float = 0.5
    # With priors at half weight the scores of other patients spread less, and 0.5 let wrong diseases
    # through as fact (adult probe, tuned: 7 confident, 2 right); 0.7: 3 confident, 2 right.
    confident_margin_without_child: float = 0.7
    # Medical specificity of a query word: the share of the library documents using it that use it in a
    # name or symptom list. Words used only in prose (一段时间, 很少, 结果, 方法, 女孩) are discourse, not
    # findings; they are weighted by share / spec_share (0 when never a name or symptom) once they are
    # common enough in the library (>= spec_min_df documents) to be judged. Library words always count.
    spec_share: float = 0.1  # dxy_dev half a: top-5 58.3% -> 59.2% (with the name evidence below)
    spec_min_df: int = 30
    # A long query word that is exactly a disease name or alias ("是否是过敏性鼻炎") is evidence for that
    # disease (a hedged mention, not proof); two-character names count name_exact_short of it. Entries
    # named after a symptom (咳嗽, 发烧) get none: the patient describes a symptom, not a diagnosis.
    w_name_exact: float = 1.5  # dxy_dev half a: 0 -> 1.5 lifted top-5 49.8% -> 58.3%; 2-3 no better
    name_exact_short: float = 0.5
    # Conditions a fired red-flag rule is about (safety rules' "suspects"): ranked first, so the references
    # and the brief of an emergency describe the emergency, not whatever shares its words.
    w_suspect: float = 3.0
    # For a patient not identified as a child, the first `fusion_depth` documents are re-ordered by
    # reciprocal-rank fusion with plain BM25 (a second view that no weight was tuned for; K is the
    # customary 60, not tuned). Children: off, their common infections need the priors. Emergencies: off.
    fusion_depth: int = 5
    fusion_k: float = 60.0
    # The dialogue view (knowledge/dialogue_view.py), when the retriever has one: BM25 of the complaint
    # against each disease's patients' words, normalised by its best score as the fielded score is, and for
    # a patient not identified as a child that ranking as a third view in the fusion. Chosen on dxy_dev half
    # a, the tuned adult probe and the held-out dialogue questions; for children since the short name forms
    # (docs/retrieval.md step 9).
    w_view_words: float = 0.5
    view_fused: bool = True  # the third fusion view (off: half a top-1 37.0% -> 36.0%)


@dataclass
class Hit:
    disease: Disease
    score: float
    matched_keywords: list[str] = field(default_factory=list)
    matched_fields: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"id": self.disease.id, "name": self.disease.name, "score": round(self.score, 4),
                "matched_keywords": self.matched_keywords, "matched_fields": self.matched_fields}


@dataclass
class SearchResult:
    query: str
    keywords: list[str]
    hits: list[Hit]
    confident: bool
    latency_ms: float
    negated: list[str] = field(default_factory=list)
    cues: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"query": self.query, "keywords": self.keywords, "negated": self.negated,
                "confident": self.confident, "latency_ms": round(self.latency_ms, 3), "cues": self.cues,
                "hits": [h.to_dict() for h in self.hits]}


_MATCH_FIELDS = ("name", "aliases", "symptoms", "description", "diagnosis")


class Retriever:
    """Search over one library. Build with `Retriever.load_or_build`."""

    def __init__(self, index: LibraryIndex, settings: SearchSettings | None = None,
                 view: DialogueView | None = None) -> None:
        self.index = index
        self.settings = settings or SearchSettings()
        self.view = view
        m = index.meta
        prev = np.where(np.isnan(m.prevalence), self.settings.default_prevalence, m.prevalence)
        self._prev_prior = self.settings.w_prevalence * np.log10(np.clip(prev, 1e-4, self.settings.prevalence_cap))
        self._log_mentions = np.log1p(np.minimum(m.mentions, self.settings.mentions_cap).astype(float))
        self._user_words = set(index.text.user_words)
        # The clinical words lay_terms.json maps everyday words to (流鼻涕 -> 流涕) are findings by the
        # project's own vocabulary: written directly they must count at least as much as via a lay word.
        self._links = SymptomLinks(m.symptoms)
        self._clinical_words = {c for targets in lay_terms().values() for c in targets}
        self._weight_cache: dict[str, float | None] = {}  # word -> _search_weight
        self._name_rows: dict[str, list[int]] = {}
        for row, (name, aliases) in enumerate(zip(m.names, m.aliases, strict=True)):
            for n in dict.fromkeys(normalise(x.strip()) for x in (name, *aliases)):
                if len(n) >= 2:
                    self._name_rows.setdefault(n, []).append(row)
        self._short_names = self._short_name_forms()
        self._short_matcher = _automaton(list(self._short_names)) if self._short_names else None
        st = self.settings
        self._evidence = EvidenceTable(index.fields["all"], index.aligned, index.size, EvidenceWeights(
            st.w_name, st.w_symptoms, st.w_prose, st.name_symptom_df, st.coverage_symptom_share))
        self._prior_cache: dict[tuple[bool, bool, str | None], np.ndarray] = {}
        # row -> the normalised sections of _MATCH_FIELDS joined by NUL, and where each section starts
        self._match_texts: dict[int, tuple[str, list[int]]] = {}
        self._scan_vocab: frozenset[str] | None = None
        self._scan_matcher: ahocorasick.Automaton | None = None
        self._symptom_entry = np.array([self._df("symptoms", normalise(strip_age(n))) >= self.settings.symptom_entry_df
                                        for n in m.names], dtype=bool)

    def _short_name_forms(self) -> dict[str, list[str]]:
        """Disease names as patients shorten them, without the generic suffix (手足口 for 手足口病, 梅尼埃 for
        梅尼埃病): form -> the names. A form has 3+ characters and is no name, alias or symptom word itself
        (肛门瘙痒 of 肛门瘙痒症 is a symptom); no other name holds it but before 病/症 (前列腺 of 前列腺病 also
        opens 前列腺炎: a body part, not a name); at least two documents write the name (日本人 of 日本人病 is
        written by its own document only), and not more than twice as many the form (放线菌: an organism); and a
        form general Chinese uses too (吉普车 of 吉普车病) must pass the generic-word test with those documents.
        TextProcessor.query_terms matches them on whole tokens after a naming word (确认是手足口)."""
        text, library_words = self.index.text, self._user_words
        candidates: dict[str, list[str]] = {}
        for name in self._name_rows:
            form = name[:-1]
            if name[-1] in "病症" and len(form) >= 3 and form[-1] not in "疾合" and form not in self._name_rows \
                    and form not in library_words and all("\u4e00" <= c <= "\u9fff" for c in form):
                candidates.setdefault(form, []).append(name)
        if not candidates:
            return {}
        shared: set[str] = set()
        inside = _automaton(list(candidates))
        for name in self._name_rows:
            for end, form in inside.iter(name):
                if name[end + 1:end + 2] not in ("病", "症"):
                    shared.add(form)
        forms: dict[str, list[str]] = {}
        for form, names in candidates.items():
            df = max(self._df("all", n) for n in names)
            if form in shared or df < 2:  # a name no other document writes is no name patients shorten
                continue
            if self._df("all", form) > 2 * df:  # written far more on its own: an organism (放线菌 32, 放线菌病 7)
                continue
            general = text.word_freq.get(form, 0) / max(text.total_freq, 1)
            if general and (df / self.size) / general < self.settings.generic_ratio:
                continue
            forms[form] = names
        return forms

    def _df(self, fname: str, term: str) -> int:
        model = self.index.fields[fname]
        tid = model.vocab_dict.get(term)
        if tid is None:
            return 0
        indptr = model.scores["indptr"]
        return int(indptr[tid + 1] - indptr[tid])

    def _keep(self, term: str) -> bool:
        """Generic-word filter: a word that general Chinese uses far more often than the library does
        (吃, 说, 起来) gets a high IDF in BM25 and matches unrelated documents, so it is dropped."""
        if len(term) == 1:  # single characters (split drug names, 吃, 睡) match at random;
            return False  # the ones that carry a symptom (吐, 咳, 痒) reach the search via lay_terms
        if term in self._user_words:
            return True
        df = self._df("all", term)
        text = self.index.text
        general = text.word_freq.get(term, 0) / max(text.total_freq, 1)
        return df > 0 and (general == 0 or (df / self.size) / general >= self.settings.generic_ratio)

    def _search_weight(self, term: str) -> float | None:
        """None for a word the generic-word filter drops, else its specificity (cached per word)."""
        try:
            return self._weight_cache[term]
        except KeyError:
            weight = self._specificity(term) if self._keep(term) else None
            if len(self._weight_cache) < 100_000:
                self._weight_cache[term] = weight
            return weight

    def _specificity(self, term: str) -> float:
        """Weight in [0, 1] of a kept query word by how medical the library's use of it is."""
        s = self.settings
        if not s.spec_share or term in self._user_words or term in self._clinical_words:
            return 1.0
        df = self._df("all", term)
        if df < s.spec_min_df:
            return 1.0
        return min(1.0, (self._df("symptoms", term) + self._df("name", term)) / df / s.spec_share)

    @classmethod
    def load_or_build(cls, library_path: Path, cache_dir: Path, progress: bool = True,
                      settings: SearchSettings | None = None,
                      index_settings: IndexSettings | None = None,
                      dialogues: Path | str | bool = True, rebuild_view: bool = False) -> Retriever:
        """The cached index (and dialogue view) of a library. ``dialogues``: a folder of dialogue JSONL
        files for the view; True or "auto" (default) takes a `dialogues/` folder beside the library file
        if there is one; False or "none": no view. The view is optional: when it cannot be read or built (no dialogue
        files, a bad file, a read-only cache) a warning is logged and the retriever has none."""
        index = LibraryIndex.load_or_build(Path(library_path), Path(cache_dir), index_settings, progress)
        if isinstance(dialogues, str):  # the service's DOCTORGLM_DIALOGUES_PATH
            value = dialogues.strip()
            dialogues = True if value.lower() == "auto" else False if value.lower() in ("none", "") else Path(value)
        folder = default_folder(index.library_path) if dialogues is True else (dialogues or None)
        view = None
        if folder is not None:
            try:
                view = DialogueView.load_or_build(index, Path(folder), Path(cache_dir), progress, rebuild=rebuild_view)
            except Exception as exc:  # noqa: BLE001 - any failure of the optional view must not stop a start
                log.warning("dialogue view from %s not used: %s: %s", folder, type(exc).__name__, exc)
        return cls(index, settings, view)

    @property
    def size(self) -> int:
        return self.index.size

    @property
    def library_path(self) -> Path:
        return self.index.library_path

    def get(self, disease_id: str) -> Disease:
        return self.index.doc(self.index.row(disease_id))

    def _symptom_vocab(self) -> frozenset[str]:
        """The library's symptom vocabulary: words at least `scan_min_df` symptom lists use."""
        if self._scan_vocab is None:
            s, model = self.settings, self.index.fields["symptoms"]
            negation = cue_words()["negation"]
            ip = model.scores["indptr"]
            self._scan_vocab = frozenset(
                t for t, i in model.vocab_dict.items()
                if 2 <= len(t) <= s.scan_max_len and ip[i + 1] - ip[i] >= s.scan_min_df and is_content(t)
                and t not in negation)  # 没有 is in some symptom lists; in a complaint it is a negation
        return self._scan_vocab

    def _symptom_matcher(self) -> ahocorasick.Automaton:
        """An Aho-Corasick automaton over the symptom vocabulary: every occurrence in one pass."""
        if self._scan_matcher is None:
            self._scan_matcher = _automaton(sorted(self._symptom_vocab()))
        return self._scan_matcher

    def scan_symptoms(self, text: str, negated: Sequence[str] = ()) -> list[str]:
        """Library symptom words contained in the complaint, as written and with everyday body-part
        and pain words made clinical (流清鼻涕 -> 鼻涕, 胸口剧痛 -> 胸痛, 脚底有红点 -> 足底, 皮疹), and
        locations joined to the quality written after them (胸口压榨样疼痛 -> 胸痛), so a compound or lay
        phrase that the tokenizer splits still reaches the symptom lists. Negated words are blanked first."""
        matcher = self._symptom_matcher()
        text = normalise(text)
        for t in sorted(negated, key=len, reverse=True):
            text = text.replace(t, "|")
        found: dict[str, None] = {}
        clinical = clinical_rewrite(text)
        for variant in (text, clinical):
            for _, word in matcher.iter(variant):  # in order of where each word ends
                found[word] = None
        vocab = self._symptom_vocab()
        for word in split_compounds(clinical):
            if word in vocab:
                found[word] = None
        return list(found)

    # -- query side -------------------------------------------------------------------------------
    def _query(self, query: str, history: Sequence[str], patient: PatientContext | None = None,
               ) -> tuple[Counter[str], QueryTerms, dict[str, float]]:
        """Weighted search words, the current turn's terms (with the record's denied symptoms among its
        negated ones) and the disease names the patient wrote."""
        s = self.settings
        weights: Counter[str] = Counter()
        named: dict[str, float] = {}
        current = self.index.text.query_terms(query, self._short_matcher)
        turns = [*decayed(list(history), s.history_decay), (query, 1.0)]
        if patient is not None:
            current.negated.extend(self._denied_terms(patient.negated_symptoms))
            if patient.symptoms:  # listed findings: a turn of their own, as present as the complaint
                turns.append(("、".join(patient.symptoms), 1.0))
        for i, (text, w) in enumerate(turns):
            is_now = i >= len(history)
            qt = current if i == len(history) else self.index.text.query_terms(text, self._short_matcher)
            for form in qt.name_forms:  # a name written short (手足口) names the disease as in full
                for name in self._short_names[form]:
                    named[name] = max(named.get(name, 0.0), w)
            # Repeats count with diminishing returns, so one long complaint does not drown the rest.
            lay = lay_terms()
            for group, factor in ((qt.terms, 1.0), (qt.subterms, s.subword_weight)):
                for term, n in Counter(group).items():
                    tw = w * factor * (1 + 0.5 * math.log(n))
                    specificity = self._search_weight(term)
                    if specificity is not None:
                        weights[term] += tw * specificity
                    if factor == 1.0 and term in self._name_rows and term not in qt.past:
                        named[term] = max(named.get(term, 0.0), w)
                    # Variants of words judged findings only (a discourse word's variants are not evidence).
                    variants = self._variants(term) if specificity is not None and specificity >= 1.0 else ()
                    for clinical in (*lay.get(term, ()), *variants):
                        weights[clinical] = max(weights[clinical], tw * s.lay_weight)
            for key in qt.lay:  # keys matched on the text, as the tokens' lay words count
                for clinical in lay[key]:
                    weights[clinical] = max(weights[clinical], w * s.lay_weight)
            if s.scan_weight:
                for term in self.scan_symptoms(text, qt.negated):
                    weights[term] = max(weights[term], w * s.scan_weight)
            for term in qt.negated:
                if is_now:
                    shortened = self._short_names.get(term, ())  # 没有手足口 denies 手足口病
                    for t in (term, *lay_terms().get(term, ()), *self._variants(term), *shortened):
                        weights.pop(t, None)  # "no fever now" overrides fever mentioned earlier
                        named.pop(t, None)
        current.negated = list(dict.fromkeys(current.negated))
        return Counter({t: v for t, v in weights.items() if v > 0}), current, named

    def _view_weights(self, weights: Counter[str], current: QueryTerms) -> dict[str, float]:
        """The complaint's words for the patients' words field: the search words, plus the current turn's
        everyday words that the generic-word filter drops for the library (as the view was built)."""
        out = dict(weights)
        negated = set(current.negated)
        for t in current.terms:
            if len(t) >= 2 and t not in out and t not in negated:
                out[t] = 1.0
        return out

    def _variants(self, word: str) -> tuple[str, ...]:
        """Symptom-list variants of a prose-only word (knowledge/synonyms.py): 流涕 -> 流鼻涕."""
        if len(word) < 2 or self._df("symptoms", word):  # a word the symptom lists use is matched as it is
            return ()
        return self._links.links(word, self._postings("all", word))

    def _denied_terms(self, denied: Sequence[str]) -> list[str]:
        """The search words of a record's denied symptoms (each as written and as the tokenizer splits it)."""
        out: list[str] = []
        for item in denied:
            qt = self.index.text.query_terms(item)
            out.extend([normalise(item.strip()), *qt.terms, *qt.subterms])
        return [t for t in dict.fromkeys(out) if t]

    def _name_bonus(self, named: dict[str, float]) -> dict[int, float]:
        """Row -> evidence for the disease names the patient wrote (the largest, when several)."""
        s = self.settings
        bonus: dict[int, float] = {}
        if not s.w_name_exact:
            return bonus
        for term, w in named.items():
            value = s.w_name_exact * (1.0 if len(term) >= 3 else s.name_exact_short) * w
            for r in self._name_rows[term]:
                if not self._symptom_entry[r] and value > bonus.get(r, 0.0):
                    bonus[r] = value
        return bonus

    def _field_scores(self, fname: str, weights: dict[str, float]) -> np.ndarray:
        model: bm25s.BM25 = self.index.fields[fname]
        vocab, sc = model.vocab_dict, model.scores
        indptr, indices, data = sc["indptr"], sc["indices"], sc["data"]
        idx, vals = [], []
        for term, w in weights.items():
            tid = vocab.get(term)
            if tid is None or w == 0:
                continue
            a, b = indptr[tid], indptr[tid + 1]
            idx.append(indices[a:b])
            vals.append(data[a:b] * w if w != 1 else data[a:b])
        if not idx:
            return np.zeros(self.size)
        return np.bincount(np.concatenate(idx), weights=np.concatenate(vals), minlength=self.size)

    def plain_scores(self, tokens: Sequence[str]) -> np.ndarray:
        """Classic BM25 over the single 'all' field; repeated tokens count again, as in rank-bm25."""
        return self._field_scores("all", dict(Counter(tokens)))

    def plain_tokens(self, query: str) -> list[str]:
        qt = self.index.text.query_terms(query)
        return qt.terms + qt.subterms

    def _all_priors(self, cues: PatientCues) -> np.ndarray:
        """Priors of every document for one combination of patient cues (a handful exist), cached."""
        key = (cues.child, cues.adult, cues.sex)
        prior = self._prior_cache.get(key)
        if prior is None:
            prior = self._priors(np.arange(self.size), cues)
            if not cues.child:
                prior *= self.settings.prior_scale_without_child
            prior.setflags(write=False)
            self._prior_cache[key] = prior
        return prior

    def _priors(self, rows: np.ndarray, cues: PatientCues) -> np.ndarray:
        s, m = self.settings, self.index.meta
        prior = (self._prev_prior[rows] + s.w_mentions * self._log_mentions[rows]
                 - s.w_symptom_entry * self._symptom_entry[rows])
        child, child_only = m.child[rows], m.child_only[rows]
        if cues.child:
            prior += s.w_child_match * child - s.w_child_mismatch * m.adult_only[rows]
        elif cues.adult:
            prior -= s.w_adult_child_only * child_only
        if cues.sex == "male":
            prior -= s.w_sex_mismatch * (m.female[rows] & ~m.male[rows])
        elif cues.sex == "female":
            prior -= s.w_sex_mismatch * (m.male[rows] & ~m.female[rows])
        return prior

    def _postings(self, fname: str, term: str) -> np.ndarray:
        model = self.index.fields[fname]
        tid = model.vocab_dict.get(term)
        if tid is None:
            return np.zeros(0, dtype=np.int32)
        ip = model.scores["indptr"]
        return model.scores["indices"][ip[tid]:ip[tid + 1]]

    def _suspect_rows(self, suspects: Sequence[str]) -> dict[int, float]:
        rows: dict[int, float] = {}
        for name in suspects:
            for r in self._name_rows.get(normalise(name.strip()), ()):
                rows[r] = self.settings.w_suspect
        return rows

    def search(self, query: str, history: Sequence[str] = (), k: int = 5,
               suspects: Sequence[str] = (), patient: PatientContext | None = None) -> SearchResult:
        """Rank the library for a complaint (+ earlier patient turns). ``suspects``: condition names the
        safety rules suspect (see safety/data/red_flags.json); their documents are ranked first.
        ``patient``: a structured record (age, sex, symptoms present and denied) read beside the text."""
        start = time.perf_counter()
        s = self.settings
        gap, agreed = np.inf, True
        if s.mode == "plain":
            tokens = self.plain_tokens(query)
            scores = self.plain_scores(tokens)
            rows = _top(scores, k)
            rows = rows[scores[rows] > 0]
            final = scores[rows]
            keywords, negated, cues = list(dict.fromkeys(tokens)), [], PatientCues()
        else:
            weights, current, named = self._query(query, history, patient)
            keywords, negated = list(weights), current.negated
            all_text = normalise(" ".join([*history, query]))
            cues = patient_cues(all_text, [*current.tokens, *(t for h in history for t in h.split())])
            if patient is not None:
                cues = patient.apply_to(cues)
            ev = self._evidence.score(weights)
            bm, cov, n_hit, n_query = ev.bm25, ev.coverage, ev.symptom_hits, ev.n_symptom_words
            top = bm.max() if self.size else 0.0
            if top > 0:
                # Every document is scored (vectorised): a rare-word BM25 shortlist would drop the common
                # disease before the priors could lift it.
                # In place: each full-length temporary is another pass over memory.
                no_match = bm <= 0
                final = np.multiply(bm, 1 / top, out=bm)
                final += np.multiply(cov, s.w_coverage, out=cov)
                final += self._all_priors(cues)
                bonus = self._name_bonus(named)
                for r, value in self._suspect_rows(suspects).items():
                    bonus[r] = max(bonus.get(r, 0.0), value)
                    no_match[r] = False  # a rule fired on the complaint: relevant without shared words
                if bonus:
                    final[list(bonus)] += list(bonus.values())
                if s.w_single and n_query >= 2:
                    final -= s.w_single * (n_hit <= 1)
                final[no_match] = -np.inf
                depth = max(k, s.fusion_depth)
                # Confidence reads the library's evidence alone (scores without the patients' words): the
                # view lifts a disease many patients ask about without telling it apart from its neighbours.
                library = final
                heard = None  # the patients' words part of the score
                if self.view is not None and s.w_view_words:
                    said = self.view.word_scores(self._view_weights(weights, current), self.size)
                    best = said.max()
                    if best > 0:
                        heard = np.multiply(said, s.w_view_words / best, out=said)
                        library = final.copy()
                        final += heard
                rows = _finite_top(final, depth)
                lib_rows = rows if heard is None else _finite_top(library, depth)
                gap = library[lib_rows[0]] - library[lib_rows[1]] if len(lib_rows) > 1 else np.inf
                lib_first = int(lib_rows[0]) if len(lib_rows) else -1
                final = final[rows]
                if s.fusion_depth and not cues.child and not suspects and len(rows) > 1:
                    listed = "、".join(patient.symptoms) if patient is not None else ""
                    plain = self.plain_scores(self.plain_tokens(" ".join(t for t in (query, listed) if t)))
                    order, fused = self._fusion(plain, rows, heard if s.view_fused else None)
                    # Agreement, as the gap, from the library's rankings alone (fielded and plain BM25): the
                    # three-way fusion only orders the results. Without the view the two fusions are one.
                    agreed = bool((order if heard is None else self._fusion(plain, lib_rows)[0])[0] == 0)
                    rows, final = rows[order], np.minimum.accumulate(fused[order])  # never rising down the list
                agreed = agreed and len(rows) > 0 and int(rows[0]) == lib_first
                rows, final = rows[:k], final[:k]
            else:
                rows, final = np.zeros(0, dtype=int), np.zeros(0)
        matcher = _automaton(keywords) if keywords and len(rows) else None
        hits = [self._hit(int(r), float(sc), keywords, matcher) for r, sc in zip(rows, final, strict=True)]
        margin = s.confident_margin if s.mode == "plain" or cues.child else s.confident_margin_without_child
        if s.mode == "plain":
            gap = final[0] - final[1] if len(final) > 1 else np.inf
        # Confident: the best document by the library's evidence leads its hand-weighted ranking by the
        # margin, (when fused) plain BM25 agrees on it, and it is still first in the final order.
        confident = bool(hits) and gap >= margin and agreed
        latency = (time.perf_counter() - start) * 1000
        return SearchResult(query=query, keywords=keywords, hits=hits, confident=confident and bool(hits),
                            latency_ms=latency, negated=negated, cues=cues.as_dict())

    def _fusion(self, plain: np.ndarray, rows: np.ndarray, heard: np.ndarray | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
        """Reciprocal-rank fusion (1/(K + rank), K = 60 as Cormack et al. 2009) of the ranking ``rows``,
        plain BM25 and, when given, the patients' words over the first `fusion_depth` rows; later rows
        keep their order. Returns the new order (positions into ``rows``) and the fused scores."""
        s = self.settings
        ranks = np.array([(plain > plain[r]).sum() if plain[r] > 0 else self.size for r in rows.tolist()])
        fused = 1 / (s.fusion_k + 1 + np.arange(len(rows))) + 1 / (s.fusion_k + 1 + ranks)
        if heard is not None:  # the patients' words, a third view
            view_ranks = np.array([(heard > heard[r]).sum() if heard[r] > 0 else self.size for r in rows.tolist()])
            fused += 1 / (s.fusion_k + 1 + view_ranks)
        depth = min(s.fusion_depth, len(rows))
        return np.concatenate([np.argsort(-fused[:depth], kind="stable"), np.arange(depth, len(rows))]), fused

    def _hit(self, row: int, score: float, keywords: list[str], matcher: ahocorasick.Automaton | None) -> Hit:
        """A ranked document with the query keywords found in its text and the sections holding them."""
        disease = self.index.doc(row)
        cached = self._match_texts.get(row)
        if cached is None:
            parts = [normalise(disease.name if f == "name" else disease.section(f)) for f in _MATCH_FIELDS]
            starts = [0]
            for part in parts[:-1]:
                starts.append(starts[-1] + len(part) + 1)
            cached = ("\0".join(parts), starts)
            if len(self._match_texts) < 20_000:
                self._match_texts[row] = cached
        text, starts = cached
        found: set[str] = set()
        fields: set[str] = set()
        if matcher is not None:
            for end, kw in matcher.iter(text):
                found.add(kw)
                fields.add(_MATCH_FIELDS[bisect.bisect_right(starts, end - len(kw) + 1) - 1])
        return Hit(disease=disease, score=score, matched_keywords=[k for k in keywords if k in found],
                   matched_fields=[f for f in _MATCH_FIELDS if f in fields])


def _automaton(words: Sequence[str]) -> ahocorasick.Automaton:
    """Aho-Corasick automaton that reports each word (its value) at every place it occurs."""
    matcher = ahocorasick.Automaton()
    for word in words:
        matcher.add_word(word, word)
    matcher.make_automaton()
    return matcher


def _finite_top(scores: np.ndarray, k: int) -> np.ndarray:
    """`_top` without the documents excluded (-inf)."""
    rows = _top(scores, k)
    return rows[np.isfinite(scores[rows])]


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores, best first (ties: lower index first, as a stable sort)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=int)
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))]
