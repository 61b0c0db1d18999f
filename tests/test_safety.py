"""Red-flag triage (safety/): rules, negation, history, advice language, rule-file validation, eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from safety import DEFAULT_RULES_PATH, SafetyAssessment, Triage, detect_language
from safety.evaluate import DEFAULT_SETS, EVAL_SETS, evaluate, load_cases

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def triage() -> Triage:
    """The rules alone: most tests here are about what the rules match (the backstop has its own tests)."""
    return Triage.from_file(backstop=False)


def rules_of(t: Triage, text: str, history: tuple[str, ...] = ()) -> list[str]:
    return t.assess(text, history).rule_ids


# -- detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("胸口痛，出了一身冷汗", "cardiac_chest_pain"),
        ("chest pain going down my left arm", "cardiac_chest_pain"),
        ("我爸突然嘴歪了，说话含糊", "stroke_signs"),
        ("her face is drooping and her speech is slurred", "stroke_signs"),
        ("喘不上气，嘴唇发紫", "severe_breathing"),
        ("吃了花生后舌头肿了", "anaphylaxis"),
        ("吐了好多血", "heavy_bleeding"),
        ("老人晕倒了叫不醒", "unconscious"),
        ("孩子全身抽搐", "seizure"),
        ("我不想活了", "suicide_risk"),
        ("I want to kill myself", "suicide_risk"),
        ("吃了一整瓶安眠药", "poisoning_overdose"),
        ("宝宝出生20天，发烧38度", "infant_danger"),
        ("怀孕8周，下腹剧烈疼痛", "pregnancy_emergency"),
    ],
)
def test_emergencies_fire_their_rule(triage: Triage, text: str, rule: str) -> None:
    a = triage.assess(text)
    assert a.level == "emergency"
    assert rule in a.rule_ids
    assert a.advice and a.prompt_note


@pytest.mark.parametrize(
    "text",
    [
        "咳嗽三天，有点黄痰，不发烧",
        "I have a mild cough and a sore throat",
        "高血压十年，一直吃氨氯地平，控制得好，可以换药吗",
        "左眼皮一直跳",
        "小腿晚上抽筋",
        "想死你了",
        "This headache is killing me, which painkiller?",
    ],
)
def test_look_alikes_are_not_emergencies(triage: Triage, text: str) -> None:
    a = triage.assess(text)
    assert a.level == "none"
    assert a.rule_ids == [] and a.advice == "" and a.prompt_note == ""


@pytest.mark.parametrize(
    "text",
    [
        "冬天在屋里烧煤取暖，早上老两口都头晕想吐",  # carbon monoxide: the source and the symptoms in two clauses
        "房间里生着炭盆，我爸睡了一觉起来头痛得厉害",
        "we run a kerosene heater in the bedroom and now both kids are dizzy and nauseous",
        "女儿把洗甲水喝了一口",  # a household chemical swallowed
        "老公喝了火碱，嘴里都烂了",
        "he swallowed all of his heart tablets an hour ago",
    ],
)
def test_poisoning_in_everyday_words(triage: Triage, text: str) -> None:
    assert "poisoning_overdose" in rules_of(triage, text)


@pytest.mark.parametrize(
    "text",
    [
        "炉子上煮着粥，有点头晕",  # a cooking stove is no carbon monoxide source on its own
        "冬天用炭盆取暖要注意什么",  # a source without symptoms
        "what's the best charcoal for a barbecue",
        "新闻上说孩子误吞磁铁很危险，玩具该怎么选",  # news, not an event
        "吃了盐酸二甲双胍以后胃有点不舒服",  # 盐酸 / 硫酸 as a drug's salt, not the acid
        "怀孕了在吃硫酸亚铁，便秘怎么办",
        "我一直在吃硫酸氢氯吡格雷，最近牙龈出血",
        "I take activated charcoal for bloating and I still feel nauseous",
        "结婚跨火盆的时候崴了脚，有点头晕",
        "用蜂窝煤炉子做饭，最近偏头痛又犯了",  # a usual migraine
        "I took all my pills this morning as usual, but my blood pressure is still high",
        "I've taken all the antibiotic tablets the doctor gave me and I still have a sore throat",
    ],
)
def test_poisoning_look_alikes(triage: Triage, text: str) -> None:
    assert rules_of(triage, text) == []


def test_news_and_online_cues_do_not_silence_an_event(triage: Triage) -> None:
    assert rules_of(triage, "爷爷看新闻时突然倒地叫不醒") != []
    assert "cardiac_chest_pain" in rules_of(triage, "刚才看新闻突然胸口剧痛出冷汗")
    assert "poisoning_overdose" in rules_of(triage, "孩子吞了纽扣电池网上说要喂蜂蜜")
    assert rules_of(triage, "网上说孩子误吞磁铁很危险") == []


def test_parents_words_for_a_fit_and_a_rash_that_does_not_fade(triage: Triage) -> None:
    # 眼睛发直 fired before 2025.06-12: these need the child's 抽筋 itself.
    for fit in ("孩子发烧抽筋了", "宝宝突然抽筋了", "女儿高烧，刚才突然抽筋了，眼睛发直"):
        assert "seizure" in rules_of(triage, fit), fit
    assert "seizure" in rules_of(triage, "抽筋好几分钟了还不停")
    for cramp in ("孩子睡觉时小腿抽筋", "游泳的时候脚抽筋了", "我儿子晚上腿抽筋，是不是缺钙",
                  "儿子打篮球抽筋了，现在好了", "女儿游泳时抽筋了，上岸揉了揉就好了", "孩子缺钙晚上抽筋怎么办",
                  "孩子胳膊抽筋", "孩子笑得抽筋"):
        assert "seizure" not in rules_of(triage, cramp), cramp
    assert "meningitis_signs" in rules_of(triage, "发烧两天，腿上有些红点，拿玻璃杯压着也不退色")
    for fever in ("孩子高烧，用了退烧药压着也不退", "孩子发烧39度，吃了退烧药体温压不退"):  # the fever, not a rash
        assert "meningitis_signs" not in rules_of(triage, fever), fever
    # 满脸青春痘 fired severe_breathing (脸…青) before the exclude; 额头上…青春痘 never did.
    assert rules_of(triage, "儿子满脸青春痘，怎么治") == []


def test_water_breathed_in_counts_with_the_signs_that_follow(triage: Triage) -> None:
    assert "severe_breathing" in rules_of(triage, "女儿在游泳池被捞上来以后，一直咳，人有点迷糊")
    assert "severe_breathing" in rules_of(triage, "we lifted him out of the bath, now he is floppy and keeps coughing")
    assert rules_of(triage, "孩子游泳时呛了一口水，咳了两声就没事了") == []
    # A bath and a cold, a baby sleepy after a bath, asthma named: no water breathed in.
    for text in ("宝宝感冒了，洗完澡从浴缸里抱出来以后一直咳嗽",
                 "After I lifted her out of the bath she got sleepy, so I put her to bed.",
                 "我儿子有哮喘，平时控制得很好。今天去游泳呛了几口水，想问下哮喘的孩子游泳要注意什么"):
        assert rules_of(triage, text) == [], text
    for text in ("we pulled our daughter out of the pool, she's coughing non-stop and very drowsy",
                 "孩子差点淹着了，救上来后一直咳嗽", "我们把儿子从泳池里拉出来，他一直咳嗽，迷迷糊糊的"):
        assert "severe_breathing" in rules_of(triage, text), text


def test_english_plans_and_magnetic_beads(triage: Triage) -> None:
    assert "suicide_risk" in rules_of(triage, "I'm ready to end it. Nobody will miss me")
    assert "suicide_risk" not in rules_of(triage, "we are going to end it with the old landlord next month")
    assert "suicide_risk" in rules_of(triage, "I'm ready to end it, nobody cares anymore")
    for text in ("I found out I'm 7 weeks pregnant. We have decided to end it.",
                 "the jump rope is ready, can my 6 year old skip rope after a sprained ankle?"):
        assert "suicide_risk" not in rules_of(triage, text), text
    assert "poisoning_overdose" in rules_of(triage, "孩子把几颗磁力珠吞下去了")


def test_not_wanting_to_be_here_is_suicidal_only_as_a_whole_statement(triage: Triage) -> None:
    assert "suicide_risk" in rules_of(triage, "I'm so tired of everything. I don't want to be here.")
    assert "suicide_risk" in rules_of(triage, "she says she doesn't want to be alive")
    assert "suicide_risk" not in rules_of(triage, "I don't want to be here in the waiting room for hours")


@pytest.mark.parametrize("text", [
    # Written by two reviewers against narrow fixes for probe 16's false alarms (a reassurance word after a
    # finding, a carbon-monoxide alarm as a device, television as a remote context, sleepiness after a short
    # night); each fix silenced some of these, so none was kept (docs/safety.md, probe 16). They guard any
    # later attempt.
    "孩子抽搐没事吧", "宝宝抽筋了没事吧？", "孩子突然抽搐体温正常怎么回事", "孩子抽搐完又正常了", "胸痛出冷汗正常吧",
    "胸口剧痛呼吸正常出冷汗", "呼吸困难没事吧", "孩子吞了纽扣电池现在没事", "吃了一瓶安眠药现在没事",
    "喝了农药现在没事", "突然口齿不清后来正常了", "2个月宝宝发烧吃奶正常", "宝宝1个月精神挺好就是发烧38度",
    "孕妇胎动减少其他都正常", "孕32周阴道流血其他都正常", "孩子摔到头吐了精神挺好",
    "孩子精神挺好，被开水烫伤了手臂起水泡", "一氧化碳报警器响了，要不要去医院？",
    "家里煤气报警器一直在响，要不要打120？", "装了一氧化碳报警器，可是孩子还是头疼想吐",
    "爷爷看电视上播的节目时一下子倒在地上没反应了", "我爸在看电视上播的球赛时突然胸口剧痛满头大汗",
    "我爸就像电视上说的那样半边身子突然动不了了", "电视上看到的那种胸口压榨样疼我现在就是，还出冷汗",
    "孩子头着地了，昨晚失眠，现在犯困", "孩子昨天摔到头，晚上没睡好，今天一直犯困",
    "昨晚没睡好今天一直犯困，早上摔到头了",
])
def test_a_reassurance_a_device_a_screen_or_a_short_night_beside_a_red_flag_does_not_cancel_it(
        triage: Triage, text: str) -> None:
    assert rules_of(triage, text) != []


# -- negation, hedging, remote history -----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "没有胸痛，也没有出汗",
        "否认胸痛、胸闷、大汗",
        "No chest pain or sweating",
        "denies chest pain, shortness of breath, or sweating",
        "He denies weakness, numbness or slurred speech",
        "没有呼吸困难，只是干咳",
        "I don't want to die, I just have a cold",
    ],
)
def test_negated_red_flags_do_not_fire(triage: Triage, text: str) -> None:
    assert triage.assess(text).level == "none"


def test_negation_scope_ends_at_but_and_punctuation(triage: Triage) -> None:
    assert triage.assess("没有发烧，但是胸口痛，出冷汗").level == "emergency"
    assert triage.assess("没有发烧但胸痛出汗").level == "emergency"
    assert triage.assess("no fever, but crushing chest pain and sweating").level == "emergency"
    assert triage.assess("I have no fever, my chest hurts and I'm sweating").level == "emergency"


def test_pseudo_negations_still_count(triage: Triage) -> None:
    # 不排除 / 无明显诱因 / 止不住 contain negation characters but affirm the finding.
    assert triage.assess("无明显诱因出现胸痛，伴大汗").level == "emergency"
    assert triage.assess("鼻子出血一个小时了止不住").level == "emergency"
    assert triage.assess("I'm not sure, but I think my face is drooping").level == "emergency"


def test_hedged_symptom_counts_but_speculative_diagnosis_does_not(triage: Triage) -> None:
    assert triage.assess("好像有点胸痛，还出冷汗").level == "emergency"
    assert triage.assess("我担心自己会不会中风，血压有点高").level == "none"


def test_remote_history_and_hypotheticals_do_not_fire(triage: Triage) -> None:
    assert triage.assess("三年前中风过，现在想问降压药").level == "none"
    assert triage.assess("I had a heart attack 5 years ago, what diet now?").level == "none"
    assert triage.assess("如果出现胸痛出汗应该怎么办").level == "none"
    assert triage.assess("What are the warning signs of a stroke?").level == "none"
    # ... but a current sign in another clause still counts.
    assert triage.assess("三年前中风过，现在左边手脚又没力气了").level == "emergency"


def test_recent_resolved_episode_still_counts(triage: Triage) -> None:
    # Documented policy: a transient seizure / faint / TIA is itself an emergency warning.
    assert triage.assess("昨天抽搐过一次现在好了").rule_ids == ["seizure"]


# -- history -----------------------------------------------------------------------------------


def test_red_flag_in_history_counts(triage: Triage) -> None:
    a = triage.assess("现在该怎么办？", history=["我爸爸突然说话不清楚"])
    assert a.level == "emergency" and a.rule_ids == ["stroke_signs"]


def test_concepts_combine_across_turns(triage: Triage) -> None:
    assert triage.assess("出冷汗，浑身湿透了").level == "none"
    assert triage.assess("出冷汗，浑身湿透了", history=["胸口一阵阵地痛"]).rule_ids == ["cardiac_chest_pain"]


def test_later_negation_retracts_earlier_red_flag(triage: Triage) -> None:
    a = triage.assess("不好意思说错了，没有胸痛，是胃痛", history=["胸痛，出汗"])
    assert a.level == "none"
    # ... and a later affirmation re-opens it.
    b = triage.assess("现在又胸痛了，还出汗", history=["胸痛出汗", "没有胸痛了"])
    assert b.level == "emergency"


def test_history_order_matters(triage: Triage) -> None:
    assert triage.assess("好的", history=["没有胸痛", "其实胸痛得厉害，出冷汗"]).level == "emergency"


# -- language, advice, shape -------------------------------------------------------------------


def test_detect_language() -> None:
    assert detect_language("我胸口痛") == "zh"
    assert detect_language("my chest hurts") == "en"
    assert detect_language("我的MRI报告") == "zh"
    assert detect_language("What does 胸痛 mean in English?") == "en"
    assert detect_language("") == "zh"


def test_advice_follows_question_language(triage: Triage) -> None:
    zh = triage.assess("我想自杀")
    en = triage.assess("I want to kill myself")
    assert zh.lang == "zh" and "120" in zh.advice and detect_language(zh.advice) == "zh"
    assert en.lang == "en" and "emergency" in en.advice.lower() and detect_language(en.advice) == "en"
    assert detect_language(zh.prompt_note) == "zh" and detect_language(en.prompt_note) == "en"
    # English question after a Chinese history: advice in the language of the question.
    mixed = triage.assess("What should I do?", history=["孩子误服了农药"])
    assert mixed.lang == "en" and detect_language(mixed.advice) == "en"


def test_prompt_note_and_to_dict(triage: Triage) -> None:
    a = triage.assess("胸口痛，出了一身冷汗")
    assert isinstance(a, SafetyAssessment)
    assert a.to_dict() == {"level": "emergency", "rules": ["cardiac_chest_pain"], "advice": a.advice}
    assert "120" in a.prompt_note and "胸痛" in a.prompt_note
    assert triage.assess("咳嗽").to_dict() == {"level": "none", "rules": [], "advice": ""}


def test_multiple_rules_fire_in_file_order(triage: Triage) -> None:
    a = triage.assess("吃了一整瓶安眠药，现在叫不醒")
    assert a.rule_ids == ["unconscious", "poisoning_overdose"]
    assert a.advice.count("120") >= 2


def test_version_and_rule_ids(triage: Triage) -> None:
    data = json.loads(DEFAULT_RULES_PATH.read_text(encoding="utf-8"))
    assert triage.version == data["version"]
    assert triage.rule_ids == [r["id"] for r in data["rules"]]
    assert Triage.from_file(DEFAULT_RULES_PATH).version == triage.version


def test_mixed_script_and_fullwidth_input(triage: Triage) -> None:
    assert triage.assess("ＣＨＥＳＴ ＰＡＩＮ and sweating").level == "emergency"  # NFKC
    assert triage.assess("胸痛, sweating a lot").level == "emergency"


# -- malformed rule files ----------------------------------------------------------------------


def _write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "rules.json"
    p.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return p


def _valid() -> dict:
    return json.loads(DEFAULT_RULES_PATH.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("version"), "version"),
        (lambda d: d.__setitem__("rules", []), "rules"),
        (lambda d: d["rules"][0].__setitem__("when", [["no_such_concept"]]), "unknown concept"),
        (lambda d: d["rules"][0]["advice"].pop("en"), "advice"),
        (lambda d: d["rules"][1].__setitem__("id", d["rules"][0]["id"]), "duplicate rule id"),
        (lambda d: d["concepts"]["chest_pain"]["zh"].append("胸(痛"), "bad pattern"),
        (lambda d: d["concepts"]["chest_pain"]["en"].append("x?"), "empty string"),
        (lambda d: d["modifiers"].pop("negation"), "modifiers.negation"),
        (lambda d: d["prompt_note"].__setitem__("zh", "紧急"), "conditions"),
    ],
)
def test_malformed_rule_file_raises_clear_value_error(tmp_path: Path, mutate, message: str) -> None:
    data = _valid()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=message) as info:
        Triage.from_file(path)
    assert str(path) in str(info.value)


def test_not_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        Triage.from_file(bad)
    with pytest.raises(ValueError, match="cannot read"):
        Triage.from_file(tmp_path / "missing.json")


def test_edited_rule_file_is_used(tmp_path: Path) -> None:
    data = _valid()
    data["version"] = "test-1"
    data["concepts"]["seizure"]["zh"].append("发羊癫")
    t = Triage.from_file(_write(tmp_path, data))
    assert t.version == "test-1"
    assert t.assess("他在发羊癫").rule_ids == ["seizure"]


# -- evaluation set ----------------------------------------------------------------------------


def test_eval_set_shape() -> None:
    cases = load_cases(DEFAULT_SETS[0])
    assert len(cases) >= 150
    assert sum(c.emergency for c in cases) * 2 >= len(cases)
    assert {c.lang for c in cases} == {"zh", "en"}
    tags = {c.tag for c in cases}
    assert {"negated", "remote", "resolved", "history", "lookalike"} <= tags


def test_every_rule_has_eval_cases_and_meets_goal(triage: Triage) -> None:
    cases = load_cases(DEFAULT_SETS[0])
    report = evaluate(triage, cases)
    assert set(report.rule_total) == set(triage.rule_ids), "every rule needs labelled cases"
    assert all(report.rule_hit[r] >= 1 for r in triage.rule_ids)
    assert report.recall >= 0.95
    assert report.false_alarm_rate <= 0.10


def test_holdout_set_exists_and_is_fresh() -> None:
    holdout = load_cases(DEFAULT_SETS[1])
    assert len(holdout) >= 40
    seen = {c.text for c in load_cases(DEFAULT_SETS[0])}
    assert not seen & {c.text for c in holdout}


def test_cli_eval_reports_both_sets() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "safety", "eval"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "triage_eval.jsonl" in proc.stdout and "triage_holdout.jsonl" in proc.stdout
    assert "[TUNED]" in proc.stdout and "[BLIND]" in proc.stdout and "summary:" in proc.stdout
    assert "recall" in proc.stdout and "false-alarm rate" in proc.stdout


def test_cli_eval_bad_rules_file_exit_code(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[]", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "safety", "eval", "--rules", str(bad)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "top level" in proc.stderr


def test_turn_cache_does_not_change_results(triage: Triage) -> None:
    uncached = Triage.from_file(cache_size=0)
    for case in load_cases(DEFAULT_SETS[0])[:60]:
        assert triage.assess(case.text, case.history) == uncached.assess(case.text, case.history)


# -- blind probes and generalisation ------------------------------------------------------------


def _set(name: str) -> list:
    (es,) = [e for e in EVAL_SETS if e.path.name == name]
    return load_cases(es.path)


def test_probe_sets_shape(triage: Triage) -> None:
    probe3 = _set("triage_probe3.jsonl")
    assert sum(c.emergency for c in probe3) >= 50 and sum(not c.emergency for c in probe3) >= 30
    assert {c.rule for c in probe3 if c.emergency} == set(triage.rule_ids)
    assert {c.lang for c in probe3} == {"zh", "en"}
    for name in ("triage_probe4.jsonl", "triage_probe5.jsonl"):
        cases = _set(name)
        assert len(cases) >= 30 and {c.lang for c in cases} == {"zh", "en"}


def test_rule_ids_of_eval_sets(triage: Triage) -> None:
    """Only a set written without the rules (probes 12-16) may leave an emergency's rule id out, and a tuned set
    names only real rules: a missing or misspelt id in a tuned set is an error, not a silent gap in per-rule
    recall. (Only names and ids are reported, never a complaint: some of these sets are blind.)"""
    written_blind_to_rules = {f"triage_probe{n}.jsonl" for n in (12, 13, 14, 15, 16)}
    bad = set()
    for es in EVAL_SETS:
        for case in load_cases(es.path):
            if case.emergency and case.rule is None and es.path.name not in written_blind_to_rules:
                bad.add((es.path.name, None))
            if es.kind == "tuned" and case.rule is not None and case.rule not in triage.rule_ids:
                bad.add((es.path.name, case.rule))
    assert not bad, sorted(bad, key=str)


def test_eval_sets_are_disjoint() -> None:
    seen: set[str] = set()
    for es in EVAL_SETS:
        texts = {c.text for c in load_cases(es.path)}
        assert not seen & texts, f"{es.path.name} repeats complaints of another set"
        seen |= texts


# Sets whose recall is asserted for rules + backstop (the backstop was trained on them or they were
# written to measure it); the others must reach the goal with the rules alone.
BACKSTOP_TRAINING_ONLY = {
    "triage_train_extra.jsonl", "triage_train_adult.jsonl", "triage_train_adult2.jsonl", "triage_train_child.jsonl",
    "triage_train_adult3.jsonl", "triage_adult_probe.jsonl", "triage_probe11.jsonl", "triage_probe12.jsonl",
    "triage_probe13.jsonl", "triage_probe14.jsonl", "triage_probe16.jsonl",
}


def test_every_set_keeps_false_alarms_within_goal(triage: Triage) -> None:
    serving = Triage.from_file(backstop=True)
    for es in EVAL_SETS:
        cases = load_cases(es.path)
        report = evaluate(triage, cases)
        assert report.false_alarm_rate <= 0.10, es.path.name
        if es.kind != "blind":  # blind sets are reported, never asserted (that would invite tuning)
            both = evaluate(serving, cases)
            assert both.false_alarm_rate <= 0.10, es.path.name
            assert (both if es.path.name in BACKSTOP_TRAINING_ONLY else report).recall >= 0.95, es.path.name


def test_probe7_and_backstop_training_set_shape(triage: Triage) -> None:
    kinds = {es.path.name: es.kind for es in EVAL_SETS}
    assert kinds["triage_probe7.jsonl"] == "blind" and kinds["triage_train_extra.jsonl"] == "tuned"
    probe7 = _set("triage_probe7.jsonl")
    assert len(probe7) >= 80 and sum(c.emergency for c in probe7) >= 50
    assert sum(not c.emergency for c in probe7) >= 30
    assert {c.rule for c in probe7 if c.emergency} == set(triage.rule_ids)
    assert {c.lang for c in probe7} == {"zh", "en"}
    extra = _set("triage_train_extra.jsonl")
    pos = sum(c.emergency for c in extra)
    assert len(extra) >= 250 and 0.4 <= pos / len(extra) <= 0.6
    assert {c.rule for c in extra if c.emergency} == set(triage.rule_ids)
    assert {c.lang for c in extra} == {"zh", "en"}


def test_remote_teenage_history_does_not_fire(triage: Triage) -> None:
    assert not triage.assess("I had suicidal thoughts when I was a teenager, I'm well now").is_emergency
    assert triage.assess("I have suicidal thoughts and I'm planning to end it tonight").is_emergency


@pytest.mark.parametrize(
    "text",
    [
        "心窝绞着疼，满头大汗",
        "心口压得慌，出冷汗",
        "tight chest and I can't catch my breath",
        "my dad is clutching his chest and sweating",
        "孩子嘴唇发乌，喘不上气",
        "外公说话大舌头，口齿不清",
        "奶奶半边身子不听使唤",
        "喊他不答应，倒地不起",
        "四肢一抽一抽，口吐白沫",
        "my daughter is having a fit",
        "活着一点意思都没有，想从楼上跳下去",
        "I don't want to be here anymore",
        "孩子把降糖药当糖吃了",
        "my 2yo chewed some of grandma's pills",
        "怀孕30周，一直没感觉到宝宝动",
        "I'm pregnant and haven't felt the baby kick today",
        "新生儿出生十天，摸着很烫",
        "开水把孩子半个身子都烫了",
    ],
)
def test_broadened_phrase_families_fire(triage: Triage, text: str) -> None:
    assert triage.assess(text).is_emergency


@pytest.mark.parametrize(
    "text",
    [
        "不想活得这么累，想换个工作",
        "他一边走路一边说腿没劲，是缺钙吗",
        "跑步后出了一身汗，胸口有点闷，休息就好了",
        "my husband snores and sometimes seems to stop breathing at night, is that sleep apnea?",
        "头发烫坏了，头皮有点疼",
        "医生开了一堆药，怎么吃",
        "冬天手指冻得发紫",
        "I've been shaking all over with chills and a fever of 38",
        "I have fits of coughing at night",
        "I don't feel the baby is getting enough milk",
        "宝宝2个月，体温36.8，正常吗",
        "the rash doesn't respond to the cream",
    ],
)
def test_broadened_terms_do_not_fire_on_lookalikes(triage: Triage, text: str) -> None:
    assert not triage.assess(text).is_emergency


# -- learned backstop ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def with_backstop() -> Triage:
    return Triage.from_file(backstop=True)


def _weights_file(tmp_path: Path, **overrides: object) -> Path:
    data: dict[str, object] = {
        "format": 1,
        "version": "t1",
        "threshold": 0.5,
        "bias": -3.0,
        "weights": {"w:zebra": 9.0},
    }
    data.update(overrides)
    path = tmp_path / "bs.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_backstop_loads_and_was_trained_on_tuned_sets_only(with_backstop: Triage) -> None:
    bs = with_backstop.backstop
    assert bs is not None and bs.version and 0.0 < bs.threshold < 1.0 and len(bs.weights) > 100
    meta = json.loads(Path(bs.source).read_text(encoding="utf-8"))["meta"]
    tuned = {es.path.name for es in EVAL_SETS if es.kind == "tuned"}
    blind = {es.path.name for es in EVAL_SETS if es.kind == "blind"}
    assert set(meta["training_sets"]) == tuned and not set(meta["training_sets"]) & blind
    assert {"triage_probe5.jsonl", "triage_probe6.jsonl", "triage_probe7.jsonl"} <= blind
    assert "triage_train_extra.jsonl" in meta["training_sets"]


def test_backstop_is_on_by_default_and_typed_by_the_caller(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from safety.backstop import DEFAULT_BACKSTOP_PATH

    bs = Triage.from_file().backstop
    assert bs is not None and Path(bs.source) == DEFAULT_BACKSTOP_PATH
    assert Triage.from_file(backstop=False).backstop is None
    own = Triage.from_file(backstop=_weights_file(tmp_path)).backstop
    assert own is not None and own.version == "t1"
    other = Triage.from_file(backstop=True, backstop_path=_weights_file(tmp_path)).backstop
    assert other is not None and other.version == "t1"
    assert Triage.from_file(backstop=False, backstop_path=_weights_file(tmp_path)).backstop is None
    # safety/ reads no environment: the service's settings are the one reading of the setting.
    monkeypatch.setenv("DOCTORGLM_TRIAGE_BACKSTOP", "off")
    assert Triage.from_file().backstop is not None


def test_service_settings_read_the_backstop_setting_once_with_one_type(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    for key in ("DOCTORGLM_TRIAGE_BACKSTOP", "DOCTORGLM_TRIAGE_BACKSTOP_PATH"):
        monkeypatch.delenv(key, raising=False)
    s = Settings(_env_file=None)
    assert s.triage_backstop is True and s.triage_backstop_path is None
    weights = _weights_file(tmp_path)
    monkeypatch.setenv("DOCTORGLM_TRIAGE_BACKSTOP_PATH", str(weights))
    monkeypatch.setenv("DOCTORGLM_TRIAGE_BACKSTOP", "true")
    s = Settings(_env_file=None)
    assert s.triage_backstop_path == weights
    t = Triage.from_file(backstop=s.triage_backstop, backstop_path=s.triage_backstop_path)
    assert t.backstop is not None and t.backstop.version == "t1"
    monkeypatch.setenv("DOCTORGLM_TRIAGE_BACKSTOP", "false")
    assert Settings(_env_file=None).triage_backstop is False
    # A path in the on/off setting is a clear settings error at start-up, not a crash later.
    monkeypatch.setenv("DOCTORGLM_TRIAGE_BACKSTOP", str(weights))
    with pytest.raises(ValidationError, match="triage_backstop"):
        Settings(_env_file=None)


def test_backstop_is_deterministic(with_backstop: Triage) -> None:
    from safety.train_backstop import fit, load_training

    fresh = Triage.from_file(backstop=True, cache_size=0)
    for case in load_cases(DEFAULT_SETS[-1]):
        assert with_backstop.assess(case.text, case.history) == fresh.assess(case.text, case.history)
    data = load_training(Triage.from_file(backstop=False), [DEFAULT_SETS[1]])
    a, b = fit(data.feats, data.y, 0.1), fit(data.feats, data.y, 0.1)
    assert a.weights == b.weights and a.bias == b.bias and a.to_json() == b.to_json()


def test_backstop_features_respect_negation(with_backstop: Triage) -> None:
    neg = with_backstop.features("没有胸痛，也没有出汗")
    assert "~胸痛" in neg and "胸痛" not in neg and "c~chest_pain" in neg
    pos = with_backstop.features("胸痛，出汗")
    assert "胸痛" in pos and "~胸痛" not in pos
    en = with_backstop.features("no chest pain, I can breathe fine")
    assert "~w:chest" in en and "w:chest" not in en
    bs = with_backstop.backstop
    assert bs is not None
    assert bs.probability(with_backstop.features("我没有胸口压着疼")) < bs.probability(
        with_backstop.features("我胸口压着疼")
    )
    for text in ("没有胸痛，没有出汗，没有气短", "no chest pain, no sweating, no shortness of breath"):
        assert not with_backstop.assess(text).is_emergency


def test_backstop_threshold_and_general_advice(tmp_path: Path) -> None:
    t = Triage.from_file(backstop=_weights_file(tmp_path, threshold=0.5))
    a = t.assess("there is a zebra in my kitchen")
    assert a.is_emergency and a.rule_ids == ["backstop"] and a.lang == "en"
    assert "emergency" in a.advice and a.prompt_note.startswith("URGENT")
    assert not t.assess("there is no zebra in my kitchen").is_emergency  # ~w:zebra is not w:zebra
    zh = t.assess("厨房里有一只zebra")
    assert zh.is_emergency and "120" in zh.advice and zh.prompt_note.startswith("【紧急情况】")
    # The rules keep priority: their ids and advice, not the backstop's.
    assert t.assess("胸口痛，出了一身冷汗 zebra").rule_ids == ["cardiac_chest_pain"]
    # p = sigmoid(-3 + 9) ~ 0.9975: a threshold above it keeps the request unflagged.
    high = Triage.from_file(backstop=_weights_file(tmp_path, threshold=0.999))
    assert not high.assess("there is a zebra in my kitchen").is_emergency
    assert not t.assess("my kitchen is tidy").is_emergency


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"format": 2}, '"format"'),
        ({"threshold": 1.5}, '"threshold"'),
        ({"threshold": "high"}, '"threshold"'),
        ({"bias": None}, '"bias"'),
        ({"weights": {}}, '"weights"'),
        ({"weights": {"w:a": "x"}}, "weight 'w:a'"),
        ({"version": ""}, '"version"'),
    ],
)
def test_malformed_backstop_file_is_a_clear_error(tmp_path: Path, overrides: dict, message: str) -> None:
    path = _weights_file(tmp_path, **overrides)
    with pytest.raises(ValueError, match="backstop weights file") as exc:
        Triage.from_file(backstop=path)
    assert message in str(exc.value)


def test_backstop_file_not_json_or_missing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{nope", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        Triage.from_file(backstop=bad)
    with pytest.raises(ValueError, match="cannot read"):
        Triage.from_file(backstop=tmp_path / "missing.json")


def test_cli_eval_shows_rules_only_and_backstop_columns() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "safety", "eval"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "rules only" in proc.stdout and "rules+backstop" in proc.stdout
    assert "triage_probe6.jsonl" in proc.stdout


def test_long_or_recurring_course_is_a_backstop_feature() -> None:
    from safety.triage import Triage

    triage = Triage.from_file(backstop=True)
    assert "t:chronic" in triage.features("右肩膀疼了三个月，胳膊抬不起来")
    assert "t:chronic" in triage.features("反复发作的头痛，好几年了")
    assert "t:chronic" not in triage.features("突然胸口剧痛，出冷汗")
    assert "t:chronic" not in triage.features("怀孕7个月，头痛眼花")  # a gestation, not a course
    # Learned from the data, not set by hand: a long course argues against an emergency.
    assert triage.backstop is not None and triage.backstop.weights["t:chronic"] < 0


def test_acute_glaucoma_is_an_eye_emergency() -> None:
    from safety.triage import Triage

    rules = Triage.from_file(backstop=False)
    for text in ("左眼胀痛得厉害，看灯周围有彩虹一样的圈，还恶心",
                 "eye is really painful and there are halos around lights"):
        assert rules.assess(text).rule_ids == ["sudden_vision_loss"], text
    assert rules.assess("看手机久了眼睛有点胀").level == "none"


def test_a_fever_is_not_a_burn_and_a_toddlers_poor_spirits_is_not_an_emergency() -> None:
    from safety.triage import Triage

    rules = Triage.from_file(backstop=False)
    assert rules.assess("宝宝1岁8个月，昨天晚上开始发烧，烧到39度多，反复的").level == "none"
    assert rules.assess("孩子被开水烫伤了，胸口大片起泡").rule_ids == ["severe_injury"]
    assert rules.assess("宝宝两岁，发烧第二天，精神差一点，吃饭少").level == "none"
    # ...but a baby under three months, or a named 婴儿, with the same signs is.
    assert rules.assess("宝宝一个月，这两天精神差，不吃奶").rule_ids == ["infant_danger"]
    assert rules.assess("婴儿这两天精神差，一直睡，不吃奶").rule_ids == ["infant_danger"]
    assert "infant_danger" in rules.assess("宝宝两岁，高烧后嗜睡，叫不醒").rule_ids


def test_flag_rate_counts_unlabelled_complaints(tmp_path: Path) -> None:
    data = tmp_path / "complaints.jsonl"
    lines = [{"query": "胸口压榨样疼痛，出冷汗"}, {"query": "嗓子有点干"}, {"query": "孩子发烧三天，咳嗽有痰"}]
    data.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "safety", "flag-rate", str(data)], capture_output=True, text=True,
                         cwd=REPO_ROOT, check=True).stdout
    assert "1 of 3 flagged" in out and "by the rules 1" in out and "by the backstop alone 0" in out
    bad = subprocess.run([sys.executable, "-m", "safety", "flag-rate", str(data), "--field", "text"],
                         capture_output=True, text=True, cwd=REPO_ROOT)
    assert bad.returncode == 2 and "cannot read complaints" in bad.stderr
    data.write_text("[1, 2]\n", encoding="utf-8")  # valid JSON, not an object
    bad = subprocess.run([sys.executable, "-m", "safety", "flag-rate", str(data)], capture_output=True, text=True,
                         cwd=REPO_ROOT)
    assert bad.returncode == 2 and "cannot read complaints" in bad.stderr
