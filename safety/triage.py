"""Red-flag triage: decide, before any generation, whether a patient describes an emergency.

Pure and deterministic: no model, no I/O after loading the rule file. The algorithm:

1. Every patient turn (history first, then the question) is NFKC-normalised and lower-cased, and
   every concept term of the rule file is searched in it (plain regex over synonym lists: more
   reliable than word segmentation for short, colloquial complaints).
2. Each match is classified as affirmed, negated or ignored:
   - negated: a negation cue (没有/无/否认/no/denies...) stands within a short window before it
     in the same clause (the window counts words outside other concept terms and conjunctions,
     so "否认胸痛、胸闷、大汗" negates all three), or a comma list continues a negated clause;
   - ignored: remote history (三年前, history of...), a hypothetical (如果/what to do if...),
     an educational question (怎么预防, symptoms of...), or a diagnosis word inside a speculative
     clause (会不会是中风). Hedged symptoms (好像有点胸痛) still count: for triage a possible
     red flag is a red flag.
3. Turns are read in order; the last affirmed/negated mention of a concept wins, so a red flag in
   an earlier turn still counts unless a later turn explicitly negates it. A symptom that has
   resolved (昨天抽搐过，现在好了) is NOT a negation: transient chest pain, a first seizure, a
   faint or a TIA are emergencies in themselves.
4. A rule fires when all concept groups of one of its alternatives are affirmed.
5. Only when no rule fires, the learned backstop (safety/backstop.py) may flag the request, and only
   when the request holds enough evidence for it to judge (its ``min_evidence`` content words) or an
   explicit severity/onset cue (a ``severity_cue`` concept: 突然, 剧烈): a one-word chief complaint
   (发烧, 头晕) gives a lexical model too little to go on, and its score there is noise.

Structured patient facts (from an EHR: ``age_months``, ``symptoms``, ``negated_symptoms``) are read
before the turns, as the oldest evidence: see :meth:`Triage.assess`.
"""

from __future__ import annotations

import math
import re
import unicodedata
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

from safety.backstop import (
    BACKSTOP_RULE_ID,
    Backstop,
    Mention,
    TurnScan,
    backstop_setting,
    evidence_units,
    load_backstop,
    request_features,
    turn_features,
)
from safety.language import Language, detect_language
from safety.rules import Concept, RuleSet, load_ruleset

DEFAULT_RULES_PATH = Path(__file__).resolve().parent / "data" / "red_flags.json"

Level = Literal["emergency", "none"]

# Clause and sentence separators, after NFKC (which maps ，？！：； to ASCII). A dot followed by a
# digit is a decimal point (38.5度), not a full stop.
_CLAUSE_SEP = re.compile(r"[,;!?:\n。]|\.(?!\d)")
# For negation scope an English comma does not end the clause ("denies weakness, numbness or
# slurred speech"); the word window and the scope breaks (", my ...", "but") bound it instead.
# After NFKC a Chinese full-width comma is "," right after a CJK character: still a separator.
_NEG_SEP = re.compile(r"[;!?:\n。]|\.(?!\d)|(?<![a-z0-9'\s]),|(?<=[\u3400-\u9fff]\s),")
_SENTENCE_SEP = re.compile(r"[;!?\n。]|\.(?!\d)")
_LIST_SEPS = frozenset(",、")
_MASK = "\x00"  # stands in for concept terms when measuring negation distance
_UNITS = re.compile(r"[\u3400-\u9fff]|[a-z0-9]+")
_HAS_CJK = re.compile(r"[\u3400-\u9fff]")
_HAS_LATIN = re.compile(r"[a-z]")


def _normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'").replace("\u2018", "'")


@dataclass(frozen=True, slots=True)
class SafetyAssessment:
    level: Level
    rule_ids: list[str] = field(default_factory=list)
    advice: str = ""
    prompt_note: str = ""
    lang: Language = "zh"
    suspects: list[str] = field(default_factory=list)  # conditions the fired rules are about
    # The structured patient facts the assessment read (age_months, symptoms, negated_symptoms);
    # empty when none were given.
    patient: dict[str, object] = field(default_factory=dict)

    @property
    def is_emergency(self) -> bool:
        return self.level == "emergency"

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"level": self.level, "rules": list(self.rule_ids), "advice": self.advice}
        if self.patient:
            out["patient"] = dict(self.patient)
        return out


@dataclass(frozen=True, slots=True)
class _Reading:
    """What one request says: the scanned turns, the final state of every concept, the facts used."""

    turns: list[TurnScan]
    state: dict[str, bool]
    denied: list[TurnScan]  # negated_symptoms: read as denials, never as findings
    patient: dict[str, object]


@dataclass(frozen=True, slots=True)
class _Clause:
    start: int
    end: int
    sep_before: str  # the separator that opened this clause ("" for the first one)


class Triage:
    """Red-flag rules loaded from a (hospital-editable) JSON file."""

    def __init__(self, ruleset: RuleSet, cache_size: int = 4096, backstop: Backstop | None = None) -> None:
        self._rs = ruleset
        self._mods = ruleset.modifiers
        # A conversation re-sends its earlier turns with every request: caching the (pure) per-turn
        # scan makes history nearly free. cache_size=0 disables it (the benchmark does).
        self._scan = lru_cache(maxsize=cache_size)(self._scan_turn) if cache_size > 0 else self._scan_turn
        self._backstop = backstop
        self._severity_cues = frozenset(c.name for c in ruleset.concepts if c.severity_cue)
        # Concepts that only qualify a partner (burned_child: 孩子 of a burn): as a backstop feature its state
        # would say "a child" is an emergency; its words still count as n-grams.
        self._qualifiers = frozenset(c.name for c in ruleset.concepts if c.qualifier)

    @classmethod
    def from_file(
        cls,
        path: Path | str | None = None,
        cache_size: int = 4096,
        backstop: Path | str | bool | None = None,
        backstop_path: Path | str | None = None,
    ) -> Triage:
        """Load rules from ``path`` (default: the packaged red_flags.json); ValueError if malformed.

        ``backstop``: True = the learned backstop, False = rules only, a path = that weights file,
        None = ``BACKSTOP_ENABLED_BY_DEFAULT`` (on). ``backstop_path``: the weights file when it is on
        (default: the packaged safety/data/triage_backstop.json). Nothing here reads the environment:
        the service passes its settings (DOCTORGLM_TRIAGE_BACKSTOP, DOCTORGLM_TRIAGE_BACKSTOP_PATH).
        """
        ruleset = load_ruleset(Path(path) if path is not None else DEFAULT_RULES_PATH)
        weights = backstop_setting(backstop)
        if weights is not None and backstop_path is not None:
            weights = Path(backstop_path)
        model = load_backstop(weights) if weights is not None else None
        return cls(ruleset, cache_size=cache_size, backstop=model)

    @property
    def backstop(self) -> Backstop | None:
        return self._backstop

    @property
    def version(self) -> str:
        return self._rs.version

    @property
    def rule_ids(self) -> list[str]:
        return [r.id for r in self._rs.rules]

    def assess(
        self,
        question: str,
        history: Sequence[str] = (),
        *,
        age_months: float | None = None,
        sex: str | None = None,
        symptoms: Sequence[str] | None = (),
        negated_symptoms: Sequence[str] | None = (),
    ) -> SafetyAssessment:
        """Assess the question plus earlier *patient* turns (oldest first) and structured patient facts.

        The keyword-only facts are plain values, e.g. from an EHR record (all optional):

        - ``age_months``: the patient's age in months (a number, ``>= 0``). Every concept whose
          ``age_months_below`` in the rule file is above it counts as present, as if the text said
          so: a fever at 1.5 months is an infant emergency without 新生儿 in the text.
        - ``sex``: accepted and checked (a string), but no rule uses it: a message may describe
          someone else (我老婆怀孕了…), and a sex-based exclusion would miss that emergency.
        - ``symptoms``: findings, each assessed as if the patient had written it in its own turn
          (``["胸痛", "大汗"]`` fires the cardiac rule; an item's own negation, 无发热, still counts).
        - ``negated_symptoms``: denied findings; every concept they mention is recorded as denied,
          so they never fire a rule (and reach the backstop only as denials: negated n-grams and states).

        Facts are read before the turns, as the oldest evidence: denials first, then symptoms, then
        history and question, and the last mention of a concept wins, so a patient saying 现在又胸痛了
        outweighs a record that denies chest pain. ``SafetyAssessment.patient`` says which facts were
        read. ValueError for a fact of the wrong type or a negative / non-finite age.
        """
        reading = self._read(question, history, age_months, sex, symptoms, negated_symptoms)
        state = reading.state
        present = {name for name, affirmed in state.items() if affirmed}
        fallback = " ".join((*history, *(symptoms or ())))
        lang = detect_language(question if question.strip() else fallback)
        fired = [r for r in self._rs.rules if r.matches(present)] if present else []
        if not fired:
            if self._backstop_flags(reading, present):
                ge = self._rs.general_emergency
                return SafetyAssessment(
                    level="emergency",
                    rule_ids=[BACKSTOP_RULE_ID],
                    advice=ge.advice[lang],
                    prompt_note=self._rs.prompt_note[lang].format(conditions=ge.description[lang]),
                    lang=lang,
                    patient=reading.patient,
                )
            return SafetyAssessment(level="none", lang=lang, patient=reading.patient)
        advice = "\n".join(dict.fromkeys(r.advice[lang] for r in fired))
        sep = "、" if lang == "zh" else "; "
        conditions = sep.join(r.description[lang] for r in fired)
        return SafetyAssessment(
            level="emergency",
            rule_ids=[r.id for r in fired],
            advice=advice,
            prompt_note=self._rs.prompt_note[lang].format(conditions=conditions),
            lang=lang,
            suspects=list(dict.fromkeys(name for r in fired for name in r.suspects)),
            patient=reading.patient,
        )

    def _backstop_flags(self, reading: _Reading, present: set[str]) -> bool:
        bs = self._backstop
        if bs is None:
            return False
        # Minimum evidence: too few content words for the lexical model to judge, and no explicit
        # severity/onset word either -> the rules alone decide (a one-word 发烧 is not a 120 call).
        short = bs.min_evidence > 0 and evidence_units(reading.turns) < bs.min_evidence
        if short and not self._severity_cues & present:
            return False
        return bs.probability(self._request_features(reading)) >= bs.threshold

    def _request_features(self, reading: _Reading) -> frozenset[str]:
        state = {name: v for name, v in reading.state.items() if name not in self._qualifiers}
        feats = request_features(reading.turns, state, self._negation_scope)
        if not reading.denied:
            return feats
        # A denied finding reads as 没有<finding>: every one of its n-grams is negated.
        extra = [turn_features(d.s, b"\x01" * len(d.s)) for d in reading.denied]
        return feats.union(*extra)

    def _read(
        self,
        question: str,
        history: Sequence[str],
        age_months: float | None,
        sex: str | None,
        symptoms: Sequence[str] | None,
        negated_symptoms: Sequence[str] | None,
    ) -> _Reading:
        symptoms = _text_list(symptoms, "symptoms")
        negated = _text_list(negated_symptoms, "negated_symptoms")
        if sex is not None and not isinstance(sex, str):
            raise ValueError("sex must be a string or None")
        state: dict[str, bool] = {}
        patient: dict[str, object] = {}
        if age_months is not None:
            if isinstance(age_months, bool) or not isinstance(age_months, int | float) or not (
                math.isfinite(age_months) and age_months >= 0
            ):
                raise ValueError("age_months must be a finite number of months >= 0")
            patient["age_months"] = float(age_months)
            for c in self._rs.concepts:
                if c.age_months_below is not None and age_months < c.age_months_below:
                    state[c.name] = True
        denied = [self._scan(item) for item in negated]
        for scan in denied:
            for mention in scan.mentions:
                state[mention.concept] = False
        if negated:
            patient["negated_symptoms"] = list(negated)
        if symptoms:
            patient["symptoms"] = list(symptoms)
        turns = [self._scan(turn) for turn in (*symptoms, *history, question)]
        for scan in turns:
            for mention in scan.mentions:
                state[mention.concept] = mention.affirmed
        return _Reading(turns, state, denied, patient)

    # -- matching ---------------------------------------------------------------------------

    def mentions(self, text: str) -> list[Mention]:
        """All concept mentions in one turn, in text order, with negation applied."""
        return list(self._scan(text).mentions)

    def features(self, question: str, history: Sequence[str] = ()) -> frozenset[str]:
        """The backstop's features of a request (n-grams with negation marks, concept states)."""
        return self._request_features(self._read(question, history, None, None, (), ()))

    def evidence(self, question: str, history: Sequence[str] = ()) -> tuple[int, bool]:
        """Content words of a request (what the backstop's minimum counts) and whether it holds an
        affirmed severity/onset cue (which lets the backstop judge below that minimum)."""
        reading = self._read(question, history, None, None, (), ())
        cue = any(reading.state.get(name) for name in self._severity_cues)
        return evidence_units(reading.turns), cue

    def _scan_turn(self, text: str) -> TurnScan:
        s = _normalise(text)
        mentions, masked = self._find_mentions(s)
        return TurnScan(mentions, s, masked)

    def _negation_scope(self, s: str, masked: str, mentions: tuple[Mention, ...]) -> bytearray:
        """1 for every character inside a negation scope (same cues, window and breaks as the rules)."""
        m = self._mods
        flags = bytearray(len(s))
        for mention in mentions:
            if not mention.affirmed:
                flags[mention.start : mention.end] = b"\x01" * (mention.end - mention.start)
        if m.negation.search(s) is None and m.negation_adjacent.search(s) is None:
            return flags
        window = self._rs.negation_window
        for clause in _split(s, _NEG_SEP):
            seg = m.pseudo_negation.sub(lambda x: _MASK * len(x.group()), masked[clause.start : clause.end])
            blank = m.conjunction.sub(lambda x: " " * len(x.group()), seg.replace(_MASK, " "))
            breaks = [b.start() for b in m.scope_break.finditer(seg)]
            for cue in m.negation.finditer(seg):
                stop = next((b for b in breaks if b >= cue.end()), len(seg))
                for k, unit in enumerate(_UNITS.finditer(blank, cue.end(), stop)):
                    if k == window:
                        stop = unit.start()
                        break
                a, b = clause.start + cue.end(), clause.start + stop
                flags[a:b] = b"\x01" * (b - a)
            for cue in m.negation_adjacent.finditer(seg):
                # 不 governs the word right after it: two CJK characters (不醒 / 不出来) or one Latin word.
                unit = _UNITS.match(seg, cue.end())
                if unit is not None:
                    a = clause.start + cue.end()
                    b = clause.start + min(unit.end() + (len(unit.group()) == 1), len(seg))
                    flags[a:b] = b"\x01" * (b - a)
        return flags

    def _find_mentions(self, s: str) -> tuple[tuple[Mention, ...], str]:
        found: list[tuple[int, int, Concept]] = []
        has_cjk = _HAS_CJK.search(s) is not None
        has_latin = _HAS_LATIN.search(s) is not None
        for concept in self._rs.concepts:
            excluded: list[tuple[int, int]] | None = None
            for m in _finditer(concept, s, has_cjk, has_latin):
                if m.end() == m.start():
                    continue
                if concept.exclude is not None:
                    if excluded is None:
                        excluded = [x.span() for x in concept.exclude.finditer(s)]
                    if any(a < m.end() and m.start() < b for a, b in excluded):
                        continue
                end = m.end()
                # English terms are stems ("sweat"); the mention runs to the end of the word.
                while end < len(s) and _is_latin(s[end - 1]) and _is_latin(s[end]):
                    end += 1
                found.append((m.start(), end, concept))
        if not found:
            return (), s
        found.sort(key=lambda f: (f[0], f[1]))

        chars = list(s)
        for start, end, _ in found:
            chars[start:end] = _MASK * (end - start)
        masked = "".join(chars)
        clauses = _split(s, _CLAUSE_SEP)
        clause_starts = [c.start for c in clauses]
        neg_clauses = _split(s, _NEG_SEP)
        neg_starts = [c.start for c in neg_clauses]
        sentences = _split(s, _SENTENCE_SEP)
        sentence_starts = [c.start for c in sentences]

        out: list[Mention] = []
        for start, end, concept in found:
            ci = bisect_right(clause_starts, start) - 1
            clause = clauses[ci]
            sentence = sentences[bisect_right(sentence_starts, start) - 1]
            if self._ignored(s, start, end, concept, clause, sentence):
                continue
            ni = bisect_right(neg_starts, start) - 1
            negated = self._negated(s, masked, start, end, neg_clauses, ni)
            out.append(Mention(start, end, concept.name, not negated))
        return tuple(out), masked

    def _ignored(self, s: str, start: int, end: int, concept: Concept, clause: _Clause, sentence: _Clause) -> bool:
        m = self._mods
        cs, ce = clause.start, clause.end
        # A suppressor explains a finding only in its own clause (刷牙的时候…, 早上起床…, 牙疼，…).
        if concept.unless is not None and concept.unless.search(s, cs, ce):
            return True
        if m.educational.search(s, cs, ce):
            return True
        if m.remote.search(s, cs, ce) and not m.current.search(s, cs, ce):
            return True
        # A hypothetical cue scopes forward to the end of its sentence ("如果出现胸痛、出汗，怎么办").
        if m.hypothetical.search(s, sentence.start, start):
            return True
        if m.hypothetical_post.search(s, end, ce):
            return True
        return concept.diagnosis and m.speculative.search(s, cs, ce) is not None

    def _negated(self, s: str, masked: str, start: int, end: int, clauses: list[_Clause], ci: int) -> bool:
        m = self._mods
        clause = clauses[ci]
        if self._cue_before(masked[clause.start : start]):
            return True
        if m.negation_post.match(s, end):
            return True
        # A comma list continues a negation: "denies chest pain, sweating, or arm pain". Only
        # when this clause holds nothing but concept terms and conjunctions.
        i = ci
        while _units(masked[clauses[i].start : clauses[i].end], m.conjunction) == 0:
            if clauses[i].sep_before not in _LIST_SEPS or i == 0:
                return False
            i -= 1
            prev = clauses[i]
            if _units(masked[prev.start : prev.end], m.conjunction) == 0:
                continue
            return self._cue_before(masked[prev.start : prev.end])
        return False

    def _cue_before(self, prefix: str) -> bool:
        """Does a negation cue govern the end of ``prefix`` (text from clause start to a term)?"""
        m = self._mods
        # Phrases that look negative but are not (不排除, 无明显诱因, not sure) are masked first.
        prefix = m.pseudo_negation.sub(lambda x: _MASK * len(x.group()), prefix)
        last_break = None
        for last_break in m.scope_break.finditer(prefix):  # noqa: B007 - we want the last one
            pass
        if last_break is not None:
            prefix = prefix[last_break.end() :]
        if _ends_adjacent(prefix, m.negation_adjacent):
            return True
        return any(
            _units(prefix[cue.end() :], m.conjunction) <= self._rs.negation_window
            for cue in m.negation.finditer(prefix)
        )


def _text_list(value: Sequence[str] | None, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    # A bare string is a sequence too; read as a list it would be one finding per character.
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of strings")
    return tuple(v for v in value if v.strip())


def _is_latin(ch: str) -> bool:
    return "a" <= ch <= "z"


def _finditer(concept: Concept, s: str, has_cjk: bool, has_latin: bool) -> Iterator[re.Match[str]]:
    if has_cjk and concept.zh is not None:
        yield from concept.zh.finditer(s)
    if has_latin and concept.en is not None:
        yield from concept.en.finditer(s)


def _ends_adjacent(prefix: str, pattern: re.Pattern[str]) -> bool:
    # "不" negates only what directly follows it (不发烧), unlike 没有/无 whose scope is wider;
    # otherwise 不舒服 or 说话不清 earlier in the clause would negate everything after it.
    return any(cue.end() == len(prefix) for cue in pattern.finditer(prefix))


def _units(text: str, conjunction: re.Pattern[str]) -> int:
    """Length in words (a CJK character or a Latin word), ignoring concept terms and conjunctions."""
    text = conjunction.sub(" ", text.replace(_MASK, " "))
    return len(_UNITS.findall(text))


def _split(s: str, sep: re.Pattern[str]) -> list[_Clause]:
    out: list[_Clause] = []
    start, before = 0, ""
    for m in sep.finditer(s):
        out.append(_Clause(start, m.start(), before))
        start, before = m.end(), m.group()
    out.append(_Clause(start, len(s), before))
    return out
