"""Tokenisation, filtering, negation and patient cues."""

from __future__ import annotations

import pytest

from knowledge.text import TextProcessor, is_content, patient_cues


@pytest.fixture(scope="module")
def proc() -> TextProcessor:
    return TextProcessor(["手足口病", "上呼吸道感染", "流鼻涕", "腹泻", "发烧"])


def test_user_words_stay_whole(proc: TextProcessor) -> None:
    terms = proc.query_terms("孩子得了手足口病，还有点流鼻涕").terms
    assert "手足口病" in terms and "流鼻涕" in terms


def test_stopwords_generic_and_numbers_dropped() -> None:
    for word in ("的", "医生", "请问", "怎么办", "两岁", "三个月", "39度", "十公斤"):
        assert not is_content(word), word
    for word in ("咳嗽", "腹泻", "十二指肠", "多汗"):
        assert is_content(word), word


@pytest.mark.parametrize(("text", "negated", "kept"), [
    ("没有发烧，咳嗽两天", "发烧", "咳嗽"),
    ("无腹泻，呕吐", "腹泻", "呕吐"),
    ("不咳嗽，但是流鼻涕", "咳嗽", "流鼻涕"),
    ("否认发烧和腹泻，头痛", "腹泻", "头痛"),
])
def test_negation(proc: TextProcessor, text: str, negated: str, kept: str) -> None:
    qt = proc.query_terms(text)
    assert negated in qt.negated and negated not in qt.terms
    assert kept in qt.terms


def test_fever_that_persists_is_not_negated(proc: TextProcessor) -> None:
    qt = proc.query_terms("发烧不退三天")
    assert "发烧" in qt.terms and "发烧" not in qt.negated


def test_patient_cues() -> None:
    assert patient_cues("宝宝8个月，拉肚子", ["宝宝"]).child
    assert patient_cues("孩子三岁了").child
    adult = patient_cues("我今年45岁，男，胸闷", ["男"])
    assert adult.adult and not adult.child and adult.sex == "male"
    assert patient_cues("怀孕两个月，恶心", ["怀孕"]).sex == "female"
    # A parent giving their own age still describes a child patient.
    assert not patient_cues("我30岁，孩子2岁发烧").adult


def test_clinical_rewrite_body_parts_and_pain() -> None:
    from knowledge.text import clinical_rewrite

    assert clinical_rewrite("胸口剧痛，出冷汗") == "胸痛，出冷汗"
    assert clinical_rewrite("嗓子疼肚子疼") == "咽痛腹痛"
    assert clinical_rewrite("手心脚底有红点") == "手掌足底有皮疹"  # longest match: 脚底 before 脚
    assert clinical_rewrite("头晕") == "头晕"


def test_lay_terms_map_to_symptoms_not_diseases() -> None:
    from knowledge.text import lay_terms

    lay = lay_terms()
    assert {"冷汗", "出汗"} <= set(lay["出冷汗"]) and "麻木" in lay["发麻"] and "疼痛" in lay["剧痛"]
    assert all(t not in targets for t, targets in lay.items())


@pytest.mark.parametrize(("text", "child"), [
    ("宝宝7个月了，发烧", True),
    ("1岁3个月，咳嗽", True),
    ("15个月，拉肚子", True),
    ("7个月大的男孩", True),
    ("右肩膀疼了三个月，52岁", False),  # a duration, not an age
    ("咳嗽两个多月了", False),
    ("三个月前开始胃痛", False),
    ("怀孕两个月，恶心", False),
])
def test_months_are_an_age_only_where_an_age_is_written(text: str, child: bool) -> None:
    assert patient_cues(text).child is child


def test_location_and_quality_written_apart_are_joined() -> None:
    from knowledge.text import clinical_rewrite, split_compounds

    assert "胸痛" in split_compounds(clinical_rewrite("胸口一阵阵压榨样地疼"))
    assert {"胃胀", "胃痛"} <= set(split_compounds("胃胀胃隐痛好几年了"))
    assert split_compounds("眼睛不红不痛") == []  # a negated quality joins nothing
    assert "胸痛" not in split_compounds("胸口闷，头痛")  # different clauses stay apart: 胸闷 only
    assert "胸闷" in split_compounds("胸口闷，头痛")


def test_past_mentions_are_marked(proc: TextProcessor) -> None:
    assert "发烧" in proc.query_terms("发烧后出了一身红疹").past
    assert "手足口病" in proc.query_terms("以前得过手足口病，现在又发烧").past
    assert not proc.query_terms("是不是手足口病").past


def test_symptom_links_tie_prose_words_to_listed_variants() -> None:
    import numpy as np

    from knowledge.synonyms import SymptomLinks

    # 6 documents write 流涕 in prose; 4 of them list 流鼻涕, all 6 list 鼻塞 (a companion, no shared character).
    lists = [["流鼻涕", "鼻塞"]] * 4 + [["鼻塞"]] * 2 + [["头痛"]] * 30
    links = SymptomLinks(lists)
    assert links.links("流涕", np.arange(6)) == ("流鼻涕",)
    assert SymptomLinks(lists).links("流涕", np.arange(2)) == ()  # too few documents to judge
    assert links.links("鼻塞", np.arange(6)) == ()  # a listed word needs no variant


@pytest.mark.parametrize(("text", "denied", "present"), [
    ("患儿症状：咳嗽、头痛；否认发烧、呕吐、腹泻、皮疹。", {"发烧", "呕吐", "腹泻", "皮疹"}, {"咳嗽", "头痛"}),
    ("患儿症状：流鼻涕；无：发烧、咳嗽。", {"发烧", "咳嗽"}, {"流鼻涕"}),
    ("咳嗽(+)，发烧(-)，呕吐（－），皮疹（阴性）", {"发烧", "呕吐", "皮疹"}, {"咳嗽"}),
    ("没有发烧咳嗽流鼻涕头痛", {"发烧", "咳嗽", "流鼻涕"}, {"头痛"}),  # free text: a short list only
])
def test_record_style_negation(proc: TextProcessor, text: str, denied: set[str], present: set[str]) -> None:
    qt = proc.query_terms(text)
    assert denied <= set(qt.negated) and not denied & set(qt.terms)
    assert present <= set(qt.terms)
