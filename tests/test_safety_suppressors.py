"""Suppressors ("unless" terms of the rule file) explain a finding only in their own clause.

Issue 16 item 6: a suppressor used to cancel a red flag anywhere in the sentence, so one common
word silenced an emergency (刷牙…说话不清楚, 早上起床…舌头肿了). The false-negative probes here are
generated from the rule file itself, so every suppressor added later gets its probe automatically.
"""

from __future__ import annotations

import json
import re
import re._constants as _C  # the stdlib regex parser and its opcodes: to write one string a pattern matches
import re._parser as re_parser
from pathlib import Path

import pytest

from safety import DEFAULT_RULES_PATH, Triage
from safety.evaluate import EVAL_SETS, Case, load_cases
from safety.rules import _expand, load_ruleset

RULESET = load_ruleset(DEFAULT_RULES_PATH)
RULES_DATA = json.loads(DEFAULT_RULES_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rules() -> Triage:
    return Triage.from_file(backstop=False)


def example(term: str) -> str:
    """The shortest plain string the (expanded) pattern matches: first branch, fewest repeats."""
    text = _emit(re_parser.parse(_expand(term)))
    assert re.search(_expand(term), text), (term, text)
    return text


def _emit(parsed) -> str:  # noqa: ANN001 - a re._parser.SubPattern
    out: list[str] = []
    for op, av in parsed:
        if op is _C.LITERAL:
            out.append(chr(av))
        elif op is _C.SUBPATTERN:
            out.append(_emit(av[-1]))
        elif op is _C.BRANCH:
            out.append(_emit(av[1][0]))
        elif op in (_C.MAX_REPEAT, _C.MIN_REPEAT, _C.POSSESSIVE_REPEAT):
            lo, _, item = av
            out.append(_emit(item) * lo)
        elif op is _C.IN:
            out.append(_pick(av))
        elif op is _C.ANY:
            out.append("x")
        # AT, ASSERT, ASSERT_NOT and the like match no character.
    return "".join(out)


def _pick(items) -> str:  # noqa: ANN001
    if items and items[0][0] is _C.NEGATE:
        return "了"  # a negated class ([^，。]) is satisfied by an ordinary character
    for op, av in items:
        if op is _C.LITERAL:
            return chr(av)
        if op is _C.RANGE:
            return chr(av[0])
        if op is _C.CATEGORY:
            return "1" if "DIGIT" in str(av) else "a"
    raise AssertionError(f"cannot write a character for {items}")


def _is_latin(text: str) -> bool:
    return re.search(r"[a-z]", text) is not None and re.search(r"[\u3400-\u9fff]", text) is None


def _present(t: Triage, case: Case) -> set[str]:
    state: dict[str, bool] = {}
    for turn in (*case.history, case.text):
        for m in t.mentions(turn):
            state[m.concept] = m.affirmed
    return {name for name, on in state.items() if on}


def _base_cases(t: Triage) -> dict[tuple[str, bool], Case]:
    """For each concept and script: a tuned emergency whose rule needs that concept to fire."""
    out: dict[tuple[str, bool], Case] = {}
    for es in EVAL_SETS:
        if es.kind != "tuned":
            continue
        for case in load_cases(es.path):
            if not case.emergency or case.history:
                continue
            present = _present(t, case)
            for rule in RULESET.rules:
                if not rule.matches(present):
                    continue
                for name in present:
                    if not rule.matches(present - {name}):
                        out.setdefault((name, _is_latin(case.text)), case)
    return out


def _written_base(name: str, latin: bool) -> str | None:
    """When no labelled case needs the concept: the first alternative of a rule that uses it, each
    group written by an example of its first term (e.g. 肾上腺素笔 for the epipen alternative)."""
    lang = "en" if latin else "zh"
    for rule in RULESET.rules:
        for alt in rule.when:
            if not any(name in group for group in alt):
                continue
            parts = []
            for group in alt:
                concept = name if name in group else sorted(group)[0]
                terms = RULES_DATA["concepts"][concept].get(lang) or RULES_DATA["concepts"][concept]["zh"]
                parts.append(example(terms[0]))
            return (", " if latin else "，").join(parts)
    return None


SUPPRESSORS = [
    (name, term)
    for name, entry in RULES_DATA["concepts"].items()
    for term in entry.get("unless", [])
]


def test_every_suppressor_has_a_generated_probe() -> None:
    assert len(SUPPRESSORS) >= 30  # the packaged file's suppressors, read from the file
    for name, term in SUPPRESSORS:
        assert len(example(term)) >= 2, (name, term)


def test_a_suppressor_in_another_clause_does_not_silence_an_emergency(rules: Triage) -> None:
    """False-negative probe for every suppressor: the emergency, then the suppressor's words in a
    clause of their own, must still fire the same rule."""
    bases = _base_cases(rules)
    missing, silenced = [], []
    for name, term in SUPPRESSORS:
        words = example(term)
        latin = _is_latin(words)
        case = bases.get((name, latin)) or bases.get((name, not latin))
        base = case.text if case is not None else _written_base(name, latin)
        if base is None:
            missing.append((name, term))
            continue
        expected = set(rules.assess(base).rule_ids)
        assert expected, base
        sep = ", " if _is_latin(base) else "，"
        probe = base.rstrip("。.!！?？ ") + sep + words
        got = set(rules.assess(probe).rule_ids)
        if not expected <= got:
            silenced.append((probe, sorted(expected), sorted(got)))
    assert not missing, f"no rule uses these concepts: {missing}"
    assert not silenced, silenced


def test_issue_examples_fire(rules: Triage) -> None:
    assert "stroke_signs" in rules.assess("刷牙的时候突然说话不清楚").rule_ids
    assert "anaphylaxis" in rules.assess("早上起床发现嘴唇和舌头肿了，吃过花生").rule_ids
    both = Triage.from_file(backstop=True)
    assert both.assess("早上起床发现嘴唇和舌头肿了，吃过花生").is_emergency


@pytest.mark.parametrize(
    "text",
    [
        "拔牙以后说话不清楚",  # a dental cause in the same clause still explains the speech
        "嗓子哑了说话费劲",
        "嗓子哑了，说话费劲，是不是咽炎",  # a hoarse voice said right before: the words next to the match
        "早上起床眼皮有点肿",  # morning puffiness of the eyelids is no airway swelling
        "吃了虾，早上起来眼皮肿",
        "喝醉了说话不清楚",
    ],
)
def test_suppressors_keep_their_intent_within_the_clause(rules: Triage, text: str) -> None:
    assert not rules.assess(text).is_emergency


def test_hoarseness_said_elsewhere_does_not_explain_new_slurred_speech(rules: Triage) -> None:
    assert "stroke_signs" in rules.assess("我爸突然说话费劲，嘴歪了，这两天嗓子哑").rule_ids
    assert "stroke_signs" in rules.assess("突然说话含糊，前几天嗓子哑了").rule_ids


def _with_unless(term: str) -> dict:
    data = json.loads(DEFAULT_RULES_PATH.read_text(encoding="utf-8"))
    data["concepts"]["slurred_speech"]["unless"].append(term)
    return data


@pytest.mark.parametrize("term", ["牙", "[牙齿]", "牙齿?", "(?:牙|拔牙)", "x"])
def test_validator_refuses_one_character_suppressors(tmp_path: Path, term: str) -> None:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(_with_unless(term), ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match="single character") as info:
        Triage.from_file(path, backstop=False)
    assert str(path) in str(info.value) and "slurred_speech" in str(info.value)


def test_validator_accepts_two_character_suppressors(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(_with_unless("(?:补牙|镶牙)"), ensure_ascii=False), encoding="utf-8")
    t = Triage.from_file(path, backstop=False)
    assert not t.assess("镶牙以后说话不清楚").is_emergency
    assert t.assess("说话突然不清楚，上周镶牙了").rule_ids == ["stroke_signs"]
