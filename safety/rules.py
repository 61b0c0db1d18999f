"""Loading, validating and compiling the red-flag rule file (safety/data/red_flags.json).

The file is meant to be edited by a hospital's clinical staff, so every structural mistake is
reported as a ValueError that names the file and the offending entry, and nothing is half-loaded.

Format (see the "_doc" entry in the packaged file):

- "version": a non-empty string, reported with every assessment for audit.
- "modifiers": cue lists (zh / en) for negation, scope breaks, remote history, hypotheticals...
- "concepts": name -> {"zh": [...], "en": [...], "exclude": [...], "unless": [...], "diagnosis": bool,
  "severity_cue": bool, "age_months_below": number, "qualifier": bool}.
  Terms are regular expressions matched against NFKC-normalised, lower-cased text. English terms
  may not start inside a word. ``{gapN}`` stands for up to N characters without punctuation or a
  Chinese negation character, for patterns such as ``胸{gap3}痛`` (胸口很痛, but not 胸口不痛).
  "exclude" drops a match that overlaps one of its patterns (which may span the words next to the
  match); "unless" drops a match whose clause contains one of its patterns, and each of those must
  need at least two characters (one common character would silence an emergency in any clause).
  "severity_cue" marks explicit severity/onset words, the only ones that let the learned backstop
  flag a complaint too short for it to judge; "age_months_below" gives the concept to a patient
  whose structured age (months) is below it. "qualifier" marks a concept whose terms mean it only next to
  a partner concept of its rule (burned_child: 孩子 makes a *burn* severe): the learned backstop does not see
  its state, only the words; no alternative may be satisfiable by qualifiers alone, and a qualifier is no
  severity cue.
- "rules": [{"id", "description": {zh, en}, "when": [[group, ...], ...], "advice": {zh, en},
  "suspects": [...]}]. A rule fires when every group of any one alternative in "when" is satisfied; a
  group is a concept name or several joined by "|" (any of them). "suspects" (optional) names the
  conditions the rule is about (心肌梗死, 脑梗死): the prompt designer ranks those library documents first,
  so the references and the brief of an emergency describe the emergency.
"""

from __future__ import annotations

import json
import re
import re._parser as re_parser  # the stdlib's own pattern parser: the minimum width of a suppressor
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LANGS = ("zh", "en")

# Characters a {gapN} may span: no clause punctuation and no Chinese negation, so that
# 胸{gap3}痛 matches 胸口很痛 but not 胸口不痛.
_GAP_CLASS = r"[^,，。.;；!！?？\n:：不没无未否]"
_GAP = re.compile(r"\{gap(\d{1,2})\}")

_MODIFIER_KEYS = (
    "negation",
    "negation_adjacent",
    "negation_post",
    "pseudo_negation",
    "scope_break",
    "conjunction",
    "remote",
    "current",
    "hypothetical",
    "hypothetical_post",
    "educational",
    "speculative",
)


@dataclass(frozen=True, slots=True)
class Concept:
    name: str
    pattern: re.Pattern[str]
    zh: re.Pattern[str] | None  # the Chinese terms alone (run only on text with CJK characters)
    en: re.Pattern[str] | None  # the English terms alone (run only on text with Latin letters)
    exclude: re.Pattern[str] | None  # drops a match that overlaps one of these
    unless: re.Pattern[str] | None  # drops a match whose clause contains one of these
    diagnosis: bool  # a disease name: ignored when the clause is speculative ("会不会是中风")
    severity_cue: bool = False  # explicit severity/onset words (突然, 剧烈): see Triage.assess
    age_months_below: float | None = None  # a structured age under this gives the concept
    qualifier: bool = False  # qualifies a partner concept only (孩子 of a burn): no backstop feature


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    description: Mapping[str, str]
    when: tuple[tuple[frozenset[str], ...], ...]
    advice: Mapping[str, str]
    suspects: tuple[str, ...] = ()

    def matches(self, present: set[str] | frozenset[str]) -> bool:
        return any(all(group & present for group in alt) for alt in self.when)


@dataclass(frozen=True, slots=True)
class Modifiers:
    negation: re.Pattern[str]
    negation_adjacent: re.Pattern[str]
    negation_post: re.Pattern[str]
    pseudo_negation: re.Pattern[str]
    scope_break: re.Pattern[str]
    conjunction: re.Pattern[str]
    remote: re.Pattern[str]
    current: re.Pattern[str]
    hypothetical: re.Pattern[str]
    hypothetical_post: re.Pattern[str]
    educational: re.Pattern[str]
    speculative: re.Pattern[str]


@dataclass(frozen=True, slots=True)
class RuleSet:
    version: str
    concepts: tuple[Concept, ...]
    rules: tuple[Rule, ...]
    modifiers: Modifiers
    negation_window: int
    prompt_note: Mapping[str, str]
    source: str
    # Advice when only the learned backstop flags a request (no specific rule fired).
    general_emergency: GeneralAdvice = field(default_factory=lambda: DEFAULT_GENERAL)


@dataclass(frozen=True, slots=True)
class GeneralAdvice:
    description: Mapping[str, str]
    advice: Mapping[str, str]


DEFAULT_GENERAL = GeneralAdvice(
    description={
        "zh": "可能的急症（描述提示危险信号）",
        "en": "a possible emergency (warning signs in the description)",
    },
    advice={
        "zh": "您描述的情况可能是急症：请立即拨打120或马上到最近的急诊就诊，不要等待观察。",
        "en": "What you describe may be an emergency: call emergency services or go to the nearest emergency "
        "department now; do not wait to see if it passes.",
    },
)


def load_ruleset(path: Path) -> RuleSet:
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read red-flag rule file {path}: {exc}") from exc
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"red-flag rule file {path} is not valid JSON: {exc}") from exc
    return parse_ruleset(data, source=str(path))


def parse_ruleset(data: Any, source: str = "<rules>") -> RuleSet:
    def fail(msg: str) -> ValueError:
        return ValueError(f"red-flag rule file {source}: {msg}")

    if not isinstance(data, dict):
        raise fail("top level must be a JSON object")
    version = data.get("version")
    if not isinstance(version, str) or not version.strip():
        raise fail('"version" must be a non-empty string')

    mods_raw = data.get("modifiers")
    if not isinstance(mods_raw, dict):
        raise fail('"modifiers" must be an object')
    mods: dict[str, re.Pattern[str]] = {}
    for key in _MODIFIER_KEYS:
        entry = mods_raw.get(key)
        if not isinstance(entry, dict):
            raise fail(f'modifiers.{key} must be an object with "zh" and "en" lists')
        zh, en = _term_lists(entry, f"modifiers.{key}", fail)
        mods[key] = _compile(zh, en, f"modifiers.{key}", fail, allow_empty=True)
    window = data.get("negation_window", 6)
    if not isinstance(window, int) or isinstance(window, bool) or not 0 <= window <= 30:
        raise fail('"negation_window" must be an integer between 0 and 30')

    concepts_raw = data.get("concepts")
    if not isinstance(concepts_raw, dict) or not concepts_raw:
        raise fail('"concepts" must be a non-empty object')
    concepts: list[Concept] = []
    for name, entry in concepts_raw.items():
        where = f"concepts.{name}"
        if not isinstance(entry, dict):
            raise fail(f"{where} must be an object")
        zh, en = _term_lists(entry, where, fail)
        if not zh and not en:
            raise fail(f"{where} has no terms")
        exclude = _list(entry.get("exclude", []), f"{where}.exclude", fail)
        unless = _list(entry.get("unless", []), f"{where}.unless", fail)
        unless_pattern = _compile(unless, [], f"{where}.unless", fail) if unless else None
        for term in unless:
            if _min_width(term) < 2:
                raise fail(
                    f"{where}.unless: {term!r} can match a single character; a suppressor needs at least two "
                    "(one common character would silence an emergency in any clause that has it)"
                )
        diagnosis = _flag(entry, "diagnosis", where, fail)
        severity_cue = _flag(entry, "severity_cue", where, fail)
        qualifier = _flag(entry, "qualifier", where, fail)
        if qualifier and severity_cue:
            raise fail(f"{where}: a qualifier cannot be a severity_cue (its state is no evidence on its own)")
        age_below = entry.get("age_months_below")
        if age_below is not None and (
            not isinstance(age_below, int | float) or isinstance(age_below, bool) or not 0 < age_below <= 1200
        ):
            raise fail(f"{where}.age_months_below must be a number of months in (0, 1200]")
        split = compile_split(zh, en, where, fail)
        concepts.append(
            Concept(
                name=name,
                pattern=_compile(zh, en, where, fail),
                zh=split[0],
                en=split[1],
                exclude=_compile(exclude, [], f"{where}.exclude", fail) if exclude else None,
                unless=unless_pattern,
                diagnosis=diagnosis,
                severity_cue=severity_cue,
                age_months_below=float(age_below) if age_below is not None else None,
                qualifier=qualifier,
            )
        )

    rules_raw = data.get("rules")
    if not isinstance(rules_raw, list) or not rules_raw:
        raise fail('"rules" must be a non-empty list')
    known = {c.name for c in concepts}
    qualifiers = {c.name for c in concepts if c.qualifier}
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, entry in enumerate(rules_raw):
        if not isinstance(entry, dict):
            raise fail(f"rules[{i}] must be an object")
        rid = entry.get("id")
        if not isinstance(rid, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", rid):
            raise fail(f"rules[{i}].id must be a lower_snake_case string")
        if rid in seen:
            raise fail(f"duplicate rule id {rid!r}")
        seen.add(rid)
        description = _texts(entry.get("description"), f"rule {rid}: description", fail)
        advice = _texts(entry.get("advice"), f"rule {rid}: advice", fail)
        when_raw = entry.get("when")
        if not isinstance(when_raw, list) or not when_raw:
            raise fail(f"rule {rid}: when must be a non-empty list of alternatives")
        alts: list[tuple[frozenset[str], ...]] = []
        for alt in when_raw:
            if not isinstance(alt, list) or not alt:
                raise fail(f"rule {rid}: each alternative in when must be a non-empty list")
            groups: list[frozenset[str]] = []
            for group in alt:
                if not isinstance(group, str):
                    raise fail(f"rule {rid}: a group must be a string like 'a | b'")
                names = frozenset(n.strip() for n in group.split("|") if n.strip())
                unknown = sorted(names - known)
                if not names or unknown:
                    raise fail(f"rule {rid}: unknown concept(s) {unknown or [group]}")
                groups.append(names)
            if all(group & qualifiers for group in groups):
                raise fail(f"rule {rid}: an alternative that qualifier concepts alone can satisfy ({alt}); a "
                           "qualifier only qualifies a partner group of another concept")
            alts.append(tuple(groups))
        suspects = entry.get("suspects", [])
        if not isinstance(suspects, list) or not all(isinstance(x, str) and x.strip() for x in suspects):
            raise fail(f"rule {rid}: suspects must be a list of condition names")
        rules.append(Rule(id=rid, description=description, when=tuple(alts), advice=advice,
                          suspects=tuple(x.strip() for x in suspects)))

    used = {name for rule in rules for alt in rule.when for group in alt for name in group}
    if unused := sorted(qualifiers - used):
        raise fail(f"qualifier concept(s) {unused} used by no rule (a qualifier qualifies a partner in a rule)")

    note = _texts(data.get("prompt_note"), "prompt_note", fail)
    for lang, text in note.items():
        if "{conditions}" not in text:
            raise fail(f"prompt_note.{lang} must contain the {{conditions}} placeholder")

    general = DEFAULT_GENERAL
    if "general_emergency" in data:
        ge = data["general_emergency"]
        if not isinstance(ge, dict):
            raise fail('"general_emergency" must be an object with "description" and "advice"')
        general = GeneralAdvice(
            description=_texts(ge.get("description"), "general_emergency: description", fail),
            advice=_texts(ge.get("advice"), "general_emergency: advice", fail),
        )

    return RuleSet(
        version=version.strip(),
        concepts=tuple(concepts),
        rules=tuple(rules),
        modifiers=Modifiers(**mods),
        negation_window=window,
        prompt_note=note,
        source=source,
        general_emergency=general,
    )


def _flag(entry: dict[str, Any], name: str, where: str, fail: Any) -> bool:
    value = entry.get(name, False)
    if not isinstance(value, bool):
        raise fail(f"{where}.{name} must be true or false")
    return value


def _list(value: Any, where: str, fail: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
        raise fail(f"{where} must be a list of non-empty strings")
    return value


def _term_lists(entry: dict[str, Any], where: str, fail: Any) -> tuple[list[str], list[str]]:
    return _list(entry.get("zh", []), f"{where}.zh", fail), _list(entry.get("en", []), f"{where}.en", fail)


def _texts(value: Any, where: str, fail: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise fail(f"{where} must be an object with zh and en texts")
    out: dict[str, str] = {}
    for lang in LANGS:
        text = value.get(lang)
        if not isinstance(text, str) or not text.strip():
            raise fail(f"{where} needs a non-empty {lang!r} text")
        out[lang] = text.strip()
    return out


def _min_width(term: str) -> int:
    """The fewest characters a (compiled, valid) term can match."""
    return int(re_parser.parse(_expand(term)).getwidth()[0])


def _expand(term: str) -> str:
    return _GAP.sub(lambda m: f"{_GAP_CLASS}{{0,{int(m.group(1))}}}", term)


def _compile(zh: list[str], en: list[str], where: str, fail: Any, allow_empty: bool = False) -> re.Pattern[str]:
    # English terms may not begin inside a word ("no" must not fire inside "know"); modifier cues
    # must also end at a word end ("no" is not "now"), concept terms may be inflected ("faint-ed").
    end = r"(?![a-z])" if allow_empty else ""
    for term in zh + en:
        try:
            pat = re.compile(_expand(term))
        except re.error as exc:
            raise fail(f"{where}: bad pattern {term!r}: {exc}") from exc
        if pat.fullmatch(""):
            raise fail(f"{where}: pattern {term!r} matches the empty string")
    parts = [f"(?:{_expand(t)})" for t in zh]
    words = [f"(?:{_expand(t)}){end}" for t in en if t[:1].isalnum()]
    others = [f"(?:{_expand(t)}){end}" for t in en if not t[:1].isalnum()]
    # One word-start check in front of all word terms: it fails fast inside words, which keeps
    # matching cheap (the p99 <= 1 ms budget).
    if words:
        parts.append(r"(?<![a-z0-9])(?:" + "|".join(words) + ")")
    parts += others
    if not parts:
        if allow_empty:
            return re.compile(r"(?!x)x")  # never matches
        raise fail(f"{where} has no terms")
    return re.compile("|".join(parts))


def compile_split(zh: list[str], en: list[str], where: str, fail: Any) -> tuple[re.Pattern[str] | None, ...]:
    """Separate Chinese and English patterns, so that each runs only on text with that script."""
    return (
        _compile(zh, [], where, fail) if zh else None,
        _compile([], en, where, fail) if en else None,
    )
