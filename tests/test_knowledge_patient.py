"""Structured patient context in retrieval, and the symptom-list forms of labelled complaints."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowledge.patient import PatientContext
from knowledge.search import Retriever
from knowledge.symptom_sets import as_form, findings, symptom_list_text
from knowledge.text import PatientCues, strip_age
from tests.test_knowledge_search import write_library


@pytest.fixture()
def tiny(tmp_path: Path) -> Retriever:
    return Retriever.load_or_build(write_library(tmp_path / "lib.jsonl"), tmp_path / "cache", progress=False)


def test_listed_symptoms_are_searched_without_free_text(tiny: Retriever) -> None:
    res = tiny.search("", patient=PatientContext.from_fields(symptoms=["尿频", "尿痛"]))
    assert res.hits[0].disease.id == "d4"
    assert {"尿频", "尿痛"} <= set(res.keywords)


def test_text_and_record_combine(tiny: Retriever) -> None:
    text_only = {h.disease.id for h in tiny.search("头痛，恶心").hits}
    both = tiny.search("头痛，恶心", patient=PatientContext.from_fields(symptoms=["尿频", "尿急"]))
    assert "d4" not in text_only and both.hits[0].disease.id in {"d3", "d4"}
    assert {"d3", "d4"} <= {h.disease.id for h in both.hits}  # text and record findings both count


def test_denied_symptoms_are_removed(tiny: Retriever) -> None:
    record = PatientContext.from_fields(symptoms=["鼻塞", "咳嗽"], negated_symptoms=["发烧"])
    res = tiny.search("发烧", patient=record)
    assert "发烧" in res.negated and "发烧" not in res.keywords and "发热" not in res.keywords
    assert res.hits[0].disease.id == "d1"


def test_stated_age_and_sex_replace_the_guessed_cues() -> None:
    guessed = PatientCues(child=False, adult=True, sex="female")
    cues = PatientContext.from_fields(age_months=8, sex="male").apply_to(guessed)
    assert cues.child and not cues.adult and cues.sex == "male"
    assert PatientContext.from_fields(age=70).apply_to(PatientCues()).elderly
    assert PatientContext.from_fields(department="小儿内科").apply_to(PatientCues()).child
    assert PatientContext.from_fields(age=30, department="儿科").apply_to(PatientCues()).adult  # age wins


def test_child_age_changes_ranking(tiny: Retriever) -> None:
    adult = tiny.search("呕吐，发烧", patient=PatientContext.from_fields(age=40))
    child = tiny.search("呕吐，发烧", patient=PatientContext.from_fields(age=1))
    score = {h.disease.id: h.score for h in child.hits}
    adult_score = {h.disease.id: h.score for h in adult.hits}
    assert score["d2"] > adult_score["d2"]  # a paediatric entry gains for a one-year-old
    assert child.cues["child"] and not adult.cues["child"]


def test_record_cleaning_and_report() -> None:
    record = PatientContext.from_fields(age=2, symptoms=[" 咳嗽", "咳嗽", ""], negated_symptoms=["咳嗽", "发热"])
    assert record.symptoms == ("咳嗽",) and record.negated_symptoms == ("发热",)  # present wins over denied
    assert record.used() == {"age_months": 24.0, "symptoms": ["咳嗽"], "negated_symptoms": ["发热"]}
    assert PatientContext.from_mapping({"sex": "robot", "age": "3"}).is_empty


def test_symptom_list_forms() -> None:
    row = {"query": "孩子咳嗽", "label_disease": "肺炎", "explicit_symptoms": {"咳嗽": True, "发烧": False},
           "implicit_symptoms": {"咳痰": True}}
    assert findings(row) == (["咳嗽", "咳痰"], ["发烧"])
    assert symptom_list_text(["咳嗽", "咳痰"], ["发烧"]) == "患儿症状：咳嗽、咳痰；无发烧。"
    assert as_form(row, "list")["query"] == "患儿症状：咳嗽、咳痰；无发烧。"
    structured = as_form(row, "structured")
    assert structured["query"] == "" and structured["patient"].symptoms == ("咳嗽", "咳痰")
    assert as_form({"query": "x", "label_disease": "y"}, "list") is None


def test_strip_age_reads_the_cue_list() -> None:
    assert strip_age("小儿腹泻病") == "腹泻病" and strip_age("新生儿小儿黄疸") == "黄疸"
    assert strip_age("小儿") == "小儿"
