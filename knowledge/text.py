"""Chinese text handling for retrieval: a private jieba tokenizer, stopwords, negation, patient cues.

Segmentation runs on rjieba (jieba-rs: the same dictionary and the same DAG + max-probability route as
Python jieba, compiled; identical output on the library and the eval complaints, ~13x faster). Python
jieba still supplies the word-frequency table the generic-word filter and the sub-word split read.
Private tokenizer instances (not the module-level ones) keep our user dictionary from leaking into
other code in the same process.
"""

from __future__ import annotations

import bisect
import json
import logging
import pickle
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import ahocorasick
import jieba
import rjieba

jieba.setLogLevel(logging.CRITICAL + 10)  # jieba logs "Building prefix dict..." at INFO

DATA_DIR = Path(__file__).resolve().parent / "data"
# Frequency for user-dictionary words: field notes measured that ~10 splits names, ~100+ keeps them.
USER_WORD_FREQ = 2000
# Longest user word the dictionary keeps; longer "symptoms" are really sentences.
MAX_USER_WORD = 12

_PUNCT = re.compile(r"[\s,，.。;；:：!！?？、()（）\[\]【】<>《》\"'“”‘’/\\|~～…\-—_=+*&^%$#@`]+")
_WORDISH = re.compile(r"[\u4e00-\u9fff]|[a-z]{2,}|[0-9]+")
_NUM_CN = "零一二三四五六七八九十两半"
# Dates, ages, doses and durations ("十公斤", "两岁", "三日", "39度"): numbers say nothing about a disease.
_MEASURE = re.compile(r"^[0-9.零一二三四五六七八九十两半几百千万多第每前后]+"
                      r"[个岁周月天日号点分秒时年次回顿口毫升克斤公度斤星期小半多]*[个岁周月天日号点分秒时年次回顿口"
                      r"毫升克斤公度星期小时钟半多]?$")


def _read_list(name: str) -> frozenset[str]:
    lines = (DATA_DIR / name).read_text(encoding="utf-8").splitlines()
    return frozenset(w.strip().lower() for w in lines if w.strip() and not w.startswith("#"))


@lru_cache(maxsize=1)
def stopwords() -> frozenset[str]:
    return _read_list("stopwords.txt")


@lru_cache(maxsize=1)
def generic_words() -> frozenset[str]:
    return _read_list("generic_words.txt")


@lru_cache(maxsize=1)
def cue_words() -> dict[str, frozenset[str]]:
    raw = json.loads((DATA_DIR / "cue_words.json").read_text(encoding="utf-8"))
    return {k: frozenset(v) for k, v in raw.items() if not k.startswith("_")}


@lru_cache(maxsize=1)
def lay_terms() -> dict[str, tuple[str, ...]]:
    raw = json.loads((DATA_DIR / "lay_terms.json").read_text(encoding="utf-8"))
    return {k: tuple(v) for k, v in raw.items() if not k.startswith("_")}


@lru_cache(maxsize=1)
def _lay_matcher() -> ahocorasick.Automaton:
    # Chinese keys of two or more characters: a single character (吐, 麻, 烧) inside a longer word is
    # another word (吐字, 麻疹, 烧伤), so single characters and English words stay per token.
    matcher = ahocorasick.Automaton()
    for key in lay_terms():
        if len(key) >= 2 and all("\u4e00" <= c <= "\u9fff" for c in key):
            matcher.add_word(key, key)
    matcher.make_automaton()
    return matcher


def lay_matches(text: str) -> list[tuple[int, str]]:
    """(start, key) of the lay-map keys in a normalised text, leftmost-longest, not overlapping."""
    return [(end - len(key) + 1, key) for end, key in _lay_matcher().iter_long(text)]


@lru_cache(maxsize=1)
def body_parts() -> dict[str, str]:
    """Everyday body-part / pain words -> clinical morphemes."""
    raw = json.loads((DATA_DIR / "body_parts.json").read_text(encoding="utf-8"))
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def strip_age(name: str) -> str:
    """A disease name without its age prefixes (cue_words.json `age_prefixes`): 小儿腹泻 -> 腹泻."""
    name = name.strip()
    prefixes = sorted(cue_words()["age_prefixes"], key=len, reverse=True)
    changed = True
    while changed:  # "新生儿小儿X" style double prefixes
        changed = False
        for p in prefixes:
            if name.startswith(p) and len(name) > len(p):
                name, changed = name[len(p):], True
    return name


def _longest_first(words: Iterable[str]) -> re.Pattern[str]:
    """An alternation that, at each position, matches the longest of the words."""
    return re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)))


@lru_cache(maxsize=1)
def _body_part_rewriter() -> re.Pattern[str]:
    return _longest_first(body_parts())


@lru_cache(maxsize=1)
def _symptom_parts() -> tuple[re.Pattern[str], re.Pattern[str], frozenset[str], int]:
    raw = json.loads((DATA_DIR / "symptom_parts.json").read_text(encoding="utf-8"))
    return (_longest_first(raw["locations"]), _longest_first(raw["qualities"]), frozenset(raw["negations"]),
            raw["max_gap"])


_CLAUSE = re.compile(r"[\s,，.。;；:：!！?？|]+")


def split_compounds(text: str) -> list[str]:
    """Location + quality words a patient wrote apart within one clause (胸口压榨样疼痛 -> 胸痛,
    胃胀胃隐痛 -> 胃痛), from clinical text (see `clinical_rewrite`). A negated quality (不痛) joins
    nothing. The caller keeps the ones its vocabulary knows."""
    locations, qualities, negations, max_gap = _symptom_parts()
    out: dict[str, None] = {}
    for clause in _CLAUSE.split(text):
        places = [(m.end(), m.group()) for m in locations.finditer(clause)]
        if not places:
            continue
        for q in qualities.finditer(clause):
            if q.start() and clause[q.start() - 1] in negations:
                continue
            for end, place in places:
                if end <= q.start() and q.start() - end <= max_gap:
                    out[place + q.group()] = None
    return list(out)


def clinical_rewrite(text: str) -> str:
    """The complaint with everyday body-part and pain words replaced by clinical ones, in one
    left-to-right pass (嗓子疼 -> 咽痛, 胸口剧痛 -> 胸痛, 手心脚底 -> 手掌足底)."""
    pairs = body_parts()
    return _body_part_rewriter().sub(lambda m: pairs[m.group()], text)


# Full-width forms U+FF01..U+FF5E -> ASCII, except the Chinese punctuation the tokenizer relies on.
_FULL_WIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F) if chr(c) not in "，。！？；：（）"}


_HAS_FULL_WIDTH = re.compile("[" + "".join(map(chr, _FULL_WIDTH)) + "]")


def normalise(text: str) -> str:
    """Lower-case, full-width to half-width digits/letters (so ３岁 == 3岁)."""
    if _HAS_FULL_WIDTH.search(text):  # translate() walks every character; most complaints need none
        text = text.translate(_FULL_WIDTH)
    return text.lower()


def clean_term(term: str) -> str:
    """A library term usable as a dictionary word ('' when it is not one)."""
    term = term.strip().rstrip(".…").strip()
    if not (2 <= len(term) <= MAX_USER_WORD) or _PUNCT.search(term):
        return ""
    return normalise(term)


@lru_cache(maxsize=200_000)
def is_content(token: str) -> bool:
    """A token worth searching for: not punctuation, stopword, generic word or a bare number."""
    if len(token) < 1 or not _WORDISH.search(token):
        return False
    if token in stopwords() or token in generic_words():
        return False
    if token.isdigit() or all(c in _NUM_CN for c in token) or _MEASURE.match(token):
        return False
    return not (len(token) == 1 and not ("\u4e00" <= token <= "\u9fff"))


@dataclass
class PatientCues:
    """What the complaint says about the patient (None = not stated)."""

    child: bool = False
    adult: bool = False
    elderly: bool = False
    sex: str | None = None  # "female" / "male"

    def as_dict(self) -> dict[str, object]:
        return {"child": self.child, "adult": self.adult, "elderly": self.elderly, "sex": self.sex}


_AGE_YEARS = re.compile(r"(\d+|[" + _NUM_CN + r"]+)\s*(?:周岁|岁)")
# "N个月" is an age ("宝宝7个月", "1岁3个月", "男，5个月", "7个月大") only where an age is written: after
# the start, punctuation, a child or sex word, "岁" or "现在"/"今年"/"才"/"刚"/"满"; or before "大"/"龄".
# After a verb it is a duration ("疼了三个月", "咳嗽三个月", "持续两个多月"), which says nothing of age.
_AGE_MONTHS = re.compile(r"(?:^|(?<=[\s,，.。;；:：、!！?？宝子儿娃孩婴男女岁周在年才刚满]))"
                         r"(?:\d+|[" + _NUM_CN + r"]+)\s*(?:个多月|个半月|个月|多月)(?!前|来|以来|以上|之前|之后)"
                         r"|(?:\d+|[" + _NUM_CN + r"]+)\s*(?:个多月|个半月|个月|多月)\s*大|月龄")
_AGE_EN = re.compile(r"(\d+)[- ]?(?:year|yr)s?[- ]old|(\d+)[- ]?months?[- ]old")


def _cn_number(text: str) -> int | None:
    if text.isdigit():
        return int(text)
    digits = {c: i for i, c in enumerate("零一二三四五六七八九")}
    digits["两"] = 2
    if text == "半":
        return 0
    if "十" in text:
        tens, _, ones = text.partition("十")
        return (digits.get(tens, 1) if tens else 1) * 10 + (digits.get(ones, 0) if ones else 0)
    return digits.get(text[:1]) if text else None


def patient_cues(text: str, tokens: Iterable[str] = ()) -> PatientCues:
    """Age and sex cues from the complaint (age words, 'N岁', 'N个月', sex words)."""
    cues = cue_words()
    text = normalise(text)
    toks = set(tokens)
    out = PatientCues()
    out.child = bool(toks & cues["child"]) or bool(_AGE_MONTHS.search(text))
    for m in _AGE_YEARS.finditer(text):
        years = _cn_number(m.group(1))
        if years is None:
            continue
        if years < 14:
            out.child = True
        elif years >= 60:
            out.elderly = out.adult = True
        elif years >= 18:
            out.adult = True
    for m in _AGE_EN.finditer(text):
        years = int(m.group(1)) if m.group(1) else 0
        out.child = out.child or years < 14
        out.adult = out.adult or years >= 18
    out.elderly = out.elderly or bool(toks & cues["elderly"])
    female, male = bool(toks & cues["female"]), bool(toks & cues["male"])
    if female != male:
        out.sex = "female" if female else "male"
    if out.child and out.adult:  # a parent writing "我30岁, 孩子2岁": the child is the patient
        out.adult = out.elderly = False
    return out


_LIST_COLON = frozenset({":", "："})
# A finding marked absent as records write it: 发热(-), 呕吐（－）, 皮疹(阴性).
_ABSENT_MARK = re.compile(r"([^\s,，.。;；:：、()（）\[\]]{1,12})\s*[(（]\s*(?:[-−－]|阴性)\s*[)）]")


# A disease name written short must be named as one (确认是手足口, 怀疑手足口, 得了梅尼埃): the same characters
# elsewhere are ordinary words (表演了一个小舞蹈, 红细胞原卟啉偏高, 面包上的曲霉菌).
_NAMING_BEFORE = re.compile(
    r"(?:是|得了|患了|患有|确诊|诊断|确定|怀疑|担心|考虑|可能|疑似|说是|查出|判断|像是)"
    r"(?:为|是|了|的|成)?[^，。；！？,.;!?]{0,2}$")


@dataclass
class QueryTerms:
    """Search terms of one text: kept terms, negated terms and the raw token stream."""

    terms: list[str] = field(default_factory=list)
    subterms: list[str] = field(default_factory=list)  # dictionary sub-words of long terms
    negated: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    # Words told as past events ("感冒后耳朵疼", "以前得过肺炎"): still symptoms to match, but a disease
    # named this way is what came before, not what the patient asks about now.
    past: set[str] = field(default_factory=set)
    # Lay-map keys (lay_terms.json) found in the text itself, longest first, outside a negation: a key
    # the tokenizer splits (憋不住尿 -> 憋不住 / 尿, 胃胀 -> 胃 / 胀) never reaches the per-token lookup.
    # A negated one is among `negated` instead.
    lay: list[str] = field(default_factory=list)
    # Short forms of disease names found in the text (手足口 for 手足口病), outside a negation and not told
    # as a past event; only when the caller passes their automaton (Retriever's short name forms).
    name_forms: list[str] = field(default_factory=list)


class TextProcessor:
    """jieba with the library's vocabulary plus the filtering rules used for documents and queries."""

    def __init__(self, user_words: Iterable[str] = (), freq: int = USER_WORD_FREQ) -> None:
        self.user_words = sorted({w for w in (clean_term(t) for t in user_words) if w})
        self.freq = freq
        self._word_freq: dict[str, int] | None = None
        self._total_freq = 0
        self._segmenter: rjieba.Jieba | None = None
        self._term_parts: dict[str, tuple[str, ...] | None] = {}

    # -- dictionary -------------------------------------------------------------------------------
    @property
    def word_freq(self) -> dict[str, int]:
        """Word -> frequency in jieba's dictionary plus the user words (words only, no prefixes)."""
        if self._word_freq is None:
            tokenizer = jieba.Tokenizer()
            tokenizer.initialize()
            for word in self.user_words:
                tokenizer.add_word(word, self.freq)
            self._word_freq = {w: f for w, f in tokenizer.FREQ.items() if f}
            self._total_freq = tokenizer.total
        return self._word_freq

    @property
    def total_freq(self) -> int:
        self.word_freq  # noqa: B018 - computed with the table
        return self._total_freq

    @property
    def segmenter(self) -> rjieba.Jieba:
        """The compiled segmenter with the same user words at the same frequency (built on first use)."""
        if self._segmenter is None:
            seg = rjieba.Jieba()
            for word in self.user_words:
                seg.add_word(word, self.freq, None)
            self._segmenter = seg
        return self._segmenter

    def dump_state(self, path: Path) -> None:
        """Save the frequency table and user words: loading them is far faster than building them."""
        with path.open("wb") as fh:
            pickle.dump((self.word_freq, self.total_freq, self.user_words, self.freq), fh, protocol=5)

    @classmethod
    def from_state(cls, path: Path) -> TextProcessor:
        with path.open("rb") as fh:
            table, total, words, freq = pickle.load(fh)
        proc = cls(freq=freq)
        proc.user_words = words
        proc._word_freq, proc._total_freq = table, total
        proc.segmenter  # noqa: B018 - build now, not inside the first request
        return proc

    # -- tokenising -------------------------------------------------------------------------------
    def cut(self, text: str) -> list[str]:
        """Search-mode tokens (long words plus their dictionary sub-words), lower-cased."""
        text = normalise(text)
        return [t for t in self.segmenter.cut_for_search(text, False) if t.strip()]

    def doc_tokens(self, text: str) -> list[str]:
        """Tokens of a document field: content tokens only."""
        return [t for t in self.cut(text) if is_content(t)]

    def query_terms(self, text: str, name_forms: ahocorasick.Automaton | None = None) -> QueryTerms:
        """Content terms of a complaint, with negated ones (没有发烧, 不咳嗽, denies fever) set aside.
        ``name_forms``: an automaton of short disease-name forms to find in the text (`QueryTerms.name_forms`)."""
        text = _ABSENT_MARK.sub(r"，无\1，", normalise(text))  # an EHR's "发热(-)" is "无发热"
        cues = cue_words()
        neg, breakers, joiners = cues["negation"], cues["negation_breakers"], cues["list_joiners"]
        out = QueryTerms()
        # Precise mode for the negation walk (one token per word), search-mode sub-words added after.
        starts: list[int] = []  # where each token of the stream starts in `text`
        stream: list[str] = []
        pos = 0
        for t in self.segmenter.cut(text, False):
            if t.strip():
                starts.append(pos)
                stream.append(t)
            pos += len(t)
        out.tokens = stream
        denied_at: set[int] = set()  # starts of the tokens the negation walk holds inside a negation
        before, after = cues["past_before"], cues["past_after"]
        for i, tok in enumerate(stream):
            if tok in after and i:
                out.past.add(stream[i - 1])
            if tok in before and i + 1 < len(stream):
                out.past.add(stream[i + 1])
            elif i + 2 < len(stream) and tok + stream[i + 1] in before:  # 得过 cut as 得|过
                out.past.add(stream[i + 2])
        negating, content_seen, just_negated = False, 0, False
        for at, tok in zip(starts, stream, strict=True):
            if tok in neg:
                negating, content_seen, just_negated = True, 0, True
                continue
            if negating:
                denied_at.add(at)
            if just_negated and tok in _LIST_COLON:  # a record's "无：发热、呕吐" / "否认:" heads a list
                just_negated = False
                continue
            just_negated = False
            if negating and tok == "、":  # an enumeration: every item of the list is denied
                content_seen = 0
                continue
            if negating and (_PUNCT.fullmatch(tok) or tok in breakers) and tok not in joiners:
                negating = False
                denied_at.discard(at)
                continue
            if negating and tok in joiners:
                continue
            subs = self._content_subwords(tok)
            if subs is None:
                if negating and content_seen:
                    negating = False
                    denied_at.discard(at)
                continue
            if negating:
                out.negated.extend([tok, *subs])
                content_seen += 1
                if content_seen >= 3:  # a negation covers a short list, not the rest of the clause
                    negating = False
            else:
                out.terms.append(tok)
                out.subterms.extend(subs)
        negset = set(out.negated) - set(out.terms) - set(out.subterms)
        out.negated = [t for t in dict.fromkeys(out.negated) if t in negset]
        for start, key in lay_matches(text):
            # Denied when the token holding its first character is inside a negation (没有漏尿).
            i = bisect.bisect_right(starts, start) - 1
            denied = i >= 0 and starts[i] in denied_at
            (out.negated if denied else out.lay).append(key)
        # As the lay keys: matched on the text, since jieba splits them (手足 / 口). Most complaints hold none, so
        # the token boundaries are only laid out when one is found.
        matches = list(name_forms.iter_long(text)) if name_forms is not None else []
        if matches:
            token_starts = set(starts)
            token_ends = {at + len(tok) for at, tok in zip(starts, stream, strict=True)}
            for end, form in matches:
                start = end - len(form) + 1
                if start not in token_starts or end + 1 not in token_ends:
                    continue  # whole tokens only: 产后目 is not in 产后 / 目前, 发结节 not in 多发 / 结节
                if start in denied_at:
                    out.negated.append(form)  # 没有手足口: its names are denied, as a full name would be
                    continue
                first, last = bisect.bisect_left(starts, start), bisect.bisect_left(starts, end + 1)
                if out.past.intersection(stream[first:last]):  # 手足口后一直咳嗽: the cue marks 口
                    continue
                if _NAMING_BEFORE.search(text, max(0, start - 8), start):  # 确认是手足口, not 表演了一个小舞蹈
                    out.name_forms.append(form)
        out.negated = list(dict.fromkeys(out.negated))
        out.lay = list(dict.fromkeys(out.lay))
        out.name_forms = list(dict.fromkeys(out.name_forms))
        return out

    def _content_subwords(self, token: str) -> tuple[str, ...] | None:
        """None for a token that is not content; else its content sub-words (cached per token)."""
        if token in self._term_parts:
            return self._term_parts[token]
        parts = tuple(s for s in self._subwords(token) if is_content(s)) if is_content(token) else None
        if len(self._term_parts) < 200_000:
            self._term_parts[token] = parts
        return parts

    def _subwords(self, word: str) -> list[str]:
        # The same sub-words cut_for_search adds, so queries and documents share a vocabulary.
        if len(word) <= 2:
            return []
        freq = self.word_freq
        subs = []
        for n in (2, 3):
            if len(word) > n:
                subs.extend(word[i:i + n] for i in range(len(word) - n + 1) if freq.get(word[i:i + n]))
        return subs


def decayed(turns: Sequence[str], decay: float) -> list[tuple[str, float]]:
    """(text, weight) for history turns, most recent last: weight decay**distance from the present."""
    n = len(turns)
    return [(t, decay ** (n - i)) for i, t in enumerate(turns)]
