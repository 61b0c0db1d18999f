"""One-word chief complaints (issue 17 defect 4): the backstop needs evidence before it calls 120.

An EHR chief-complaint field is a word or two (发热, 头晕). With so few features the backstop's
normalised score let one weight decide, and it flagged 11 of 40 such complaints as emergencies.
Now the backstop judges only requests with at least ``min_evidence`` content words (chosen by
training) or an explicit severity/onset cue; the rules still judge everything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safety import DEFAULT_RULES_PATH, Triage
from safety.backstop import DEFAULT_BACKSTOP_PATH


@pytest.fixture(scope="module")
def serving() -> Triage:
    return Triage.from_file(backstop=True)


def _weights(tmp_path: Path, **overrides: object) -> Path:
    data: dict[str, object] = {
        "format": 1, "version": "t1", "threshold": 0.5, "bias": -3.0, "min_evidence": 6,
        "weights": {"晕": 9.0, "w:dizzy": 9.0},
    }
    data.update(overrides)
    path = tmp_path / "bs.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_the_packaged_backstop_was_given_a_minimum_by_training() -> None:
    data = json.loads(DEFAULT_BACKSTOP_PATH.read_text(encoding="utf-8"))
    gate = data["meta"]["cv_5fold_min_evidence"]
    assert data["min_evidence"] == gate["min_evidence"] > 0
    # Chosen below every out-of-fold catch: the gate costs no tuned recall.
    assert gate["rules_plus_backstop"]["recall"] == data["meta"]["cv_5fold"]["rules_plus_backstop"]["recall"]


@pytest.mark.parametrize(
    "text",
    ["发热", "发烧", "头痛", "头晕", "肚子疼", "拉肚子", "呕吐", "胸闷", "心慌", "乏力", "气短",
     "我头痛发烧三天怎么办？"],
)
def test_issue_one_word_complaints_are_not_emergencies(serving: Triage, text: str) -> None:
    assert serving.assess(text).level == "none"


@pytest.mark.parametrize("text", ["突发剧烈头痛", "呼吸困难口唇发紫", "胸口压榨样疼痛，出冷汗"])
def test_short_emergencies_still_fire(serving: Triage, text: str) -> None:
    assert serving.assess(text).is_emergency


def test_below_the_minimum_only_a_severity_cue_lets_the_backstop_judge(tmp_path: Path) -> None:
    t = Triage.from_file(backstop=_weights(tmp_path))
    assert t.evidence("头晕") == (2, False)
    assert not t.assess("头晕").is_emergency
    assert not t.assess("dizzy").is_emergency
    assert t.evidence("突然头晕") == (4, True)
    assert t.assess("突然头晕").rule_ids == ["backstop"]  # 突然: an onset cue, below the minimum
    assert t.assess("头晕好几天了一直没有好转").rule_ids == ["backstop"]  # enough words to judge
    # Structured findings and history are evidence too.
    assert t.assess("头晕", ["昨天开始一直这样"]).rule_ids == ["backstop"]
    # min_evidence 0 (files written before the rule): the backstop judges everything, as before.
    old = Triage.from_file(backstop=_weights(tmp_path, min_evidence=0))
    assert old.assess("头晕").rule_ids == ["backstop"]


def test_function_words_are_no_evidence(serving: Triage) -> None:
    assert serving.evidence("我的头晕了")[0] == serving.evidence("头晕")[0] == 2
    assert serving.evidence("my head is spinning")[0] == 2


@pytest.mark.parametrize("value", [-1, 1.5, "6", True])
def test_bad_min_evidence_is_a_clear_error(tmp_path: Path, value: object) -> None:
    with pytest.raises(ValueError, match="min_evidence"):
        Triage.from_file(backstop=_weights(tmp_path, min_evidence=value))


# -- qualifier concepts: a word that only qualifies a partner is no evidence on its own ------------


def test_a_child_named_without_a_burn_is_no_backstop_feature(serving: Triage) -> None:
    # 孩子 makes a burn severe (rule severe_injury); as a backstop feature its state read "a child is an
    # emergency", and 孩子发烧三天，咳嗽有痰 was told to call 120.
    feats = serving.features("孩子发烧三天，咳嗽有痰")
    assert "c:fever" in feats and "孩子" in feats
    assert not any(f.endswith("burned_child") for f in feats)
    assert serving.assess("孩子被开水烫伤了").rule_ids == ["severe_injury"]  # the rule still uses it
    assert serving.assess("my toddler got burned by hot water").rule_ids == ["severe_injury"]


def test_a_qualifier_cannot_fire_a_rule_alone(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    alone = (["burned_child"], ["burned_child", "burned_child"], ["burned_child", "burn_severe | burned_child"])
    for alternative in alone:
        data = json.loads(DEFAULT_RULES_PATH.read_text(encoding="utf-8"))
        data["rules"][0]["when"].append(alternative)
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        with pytest.raises(ValueError, match="qualifier concepts alone"):
            Triage.from_file(path)
    data = json.loads(DEFAULT_RULES_PATH.read_text(encoding="utf-8"))
    data["concepts"]["burned_child"]["severity_cue"] = True
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match="cannot be a severity_cue"):
        Triage.from_file(path)
    data = json.loads(DEFAULT_RULES_PATH.read_text(encoding="utf-8"))
    data["concepts"]["fever"]["qualifier"] = True
    for rule in data["rules"]:
        rule["when"] = [alt for alt in rule["when"] if not any("fever" in group for group in alt)] or [["seizure"]]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match="used by no rule"):
        Triage.from_file(path)
    data = json.loads(DEFAULT_RULES_PATH.read_text(encoding="utf-8"))
    data["concepts"]["burned_child"]["qualifier"] = "yes"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match="qualifier must be true or false"):
        Triage.from_file(path)
