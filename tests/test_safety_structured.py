"""Structured patient facts for triage (issue 16 item 1): age in months, symptoms, denied symptoms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safety import DEFAULT_RULES_PATH, Triage


@pytest.fixture(scope="module")
def rules() -> Triage:
    return Triage.from_file(backstop=False)


@pytest.fixture(scope="module")
def serving() -> Triage:
    return Triage.from_file(backstop=True)


def test_the_old_signature_still_works(rules: Triage) -> None:
    a = rules.assess("胸口痛，出了一身冷汗", ["昨天开始的"])
    assert a.rule_ids == ["cardiac_chest_pain"] and a.patient == {}
    assert "patient" not in a.to_dict()


def test_age_as_a_number_gives_the_infant_fever_threshold(rules: Triage) -> None:
    # The text says nothing of the age: only the number makes this an infant emergency.
    assert not rules.assess("发烧38度").is_emergency
    a = rules.assess("发烧38度", age_months=1.5)
    assert a.rule_ids == ["infant_danger"]
    assert a.patient == {"age_months": 1.5} and a.to_dict()["patient"] == {"age_months": 1.5}
    assert not rules.assess("发烧38度", age_months=4).is_emergency
    assert not rules.assess("发烧38度", age_months=30 * 12).is_emergency


def test_age_thresholds_come_from_the_rule_file(tmp_path: Path) -> None:
    data = json.loads(DEFAULT_RULES_PATH.read_text(encoding="utf-8"))
    data["concepts"]["young_infant"]["age_months_below"] = 6
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    t = Triage.from_file(path, backstop=False)
    assert t.assess("发烧38度", age_months=4).rule_ids == ["infant_danger"]
    data["concepts"]["young_infant"]["age_months_below"] = -1
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match="age_months_below"):
        Triage.from_file(path, backstop=False)


def test_mild_signs_count_for_a_structured_baby_but_not_a_toddler(rules: Triage) -> None:
    assert rules.assess("这两天精神差，不吃奶", age_months=6).rule_ids == ["infant_danger"]
    assert not rules.assess("这两天精神差，吃饭少", age_months=26).is_emergency
    # Stronger signs count for any young child, also when only the number says it is one.
    assert "infant_danger" in rules.assess("高烧后一直嗜睡", age_months=26).rule_ids


def test_structured_symptoms_are_assessed_as_if_written(rules: Triage) -> None:
    a = rules.assess("", symptoms=["胸痛", "大汗"])
    assert a.rule_ids == ["cardiac_chest_pain"] and a.patient == {"symptoms": ["胸痛", "大汗"]}
    # Free text and structured findings combine.
    assert rules.assess("出了一身冷汗", symptoms=["胸口压着疼"]).rule_ids == ["cardiac_chest_pain"]
    # An item's own negation still reads as a negation.
    assert not rules.assess("", symptoms=["无胸痛", "出汗"]).is_emergency
    assert rules.assess("", symptoms=["fever"], age_months=1).rule_ids == ["infant_danger"]


def test_negated_symptoms_never_fire_a_rule(rules: Triage, serving: Triage) -> None:
    for t in (rules, serving):
        a = t.assess("", negated_symptoms=["胸痛", "大汗", "呼吸困难", "抽搐", "昏迷"])
        assert not a.is_emergency
        assert a.patient == {"negated_symptoms": ["胸痛", "大汗", "呼吸困难", "抽搐", "昏迷"]}
    # The patient's own words are newer than the record: a current red flag still counts.
    assert rules.assess("现在又胸痛了，出冷汗", negated_symptoms=["胸痛"]).is_emergency
    # A denial in the record does not make a later affirmed concept disappear, and a finding listed
    # both ways counts as present (the symptoms are read after the denials).
    assert rules.assess("", symptoms=["胸痛", "大汗"], negated_symptoms=["胸痛"]).is_emergency


def test_denied_symptoms_reach_the_backstop_only_as_denials(tmp_path: Path) -> None:
    # A backstop that would flag anything saying 胸痛: a denied 胸痛 must not look like one.
    weights = {"format": 1, "version": "t1", "threshold": 0.5, "bias": -3.0, "weights": {"胸痛": 9.0, "~胸痛": -9.0}}
    path = tmp_path / "bs.json"
    path.write_text(json.dumps(weights), encoding="utf-8")
    t = Triage.from_file(backstop=path)
    assert t.assess("", symptoms=["胸痛"]).rule_ids == ["backstop"]
    assert not t.assess("", negated_symptoms=["胸痛"]).is_emergency
    assert not t.assess("有点累", negated_symptoms=["胸痛"]).is_emergency


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"age_months": -1}, "age_months"),
        ({"age_months": float("nan")}, "age_months"),
        ({"age_months": True}, "age_months"),
        ({"age_months": "3"}, "age_months"),
        ({"symptoms": "胸痛"}, "symptoms"),
        ({"symptoms": ["胸痛", 3]}, "symptoms"),
        ({"negated_symptoms": "发热"}, "negated_symptoms"),
        ({"sex": 1}, "sex"),
    ],
)
def test_bad_facts_are_a_clear_value_error(rules: Triage, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rules.assess("头痛", **kwargs)


def test_sex_is_accepted_but_never_suppresses_a_red_flag(rules: Triage) -> None:
    # A message may describe someone else: 我老婆怀孕了… sent from a man's record.
    a = rules.assess("我老婆怀孕8周，下腹剧烈疼痛", sex="male")
    assert a.rule_ids == ["pregnancy_emergency"] and "sex" not in a.patient


def test_empty_items_are_ignored_and_history_still_counts(rules: Triage) -> None:
    a = rules.assess("现在怎么办", ["我爸爸突然说话不清楚"], symptoms=["", "  "], negated_symptoms=[])
    assert a.rule_ids == ["stroke_signs"] and a.patient == {}
