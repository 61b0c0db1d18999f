"""Symptom-list forms of a labelled complaint: the findings an EHR holds, as a list string and as a record.

`dxy_dev` rows carry `explicit_symptoms` / `implicit_symptoms` ({symptom: true = present, false = denied}).
From them a row becomes `患儿症状：咳嗽、咳痰；无发热。` (the list form) or a `PatientContext` with the
same findings and no free text (the structured form). The subject word and department say "child"
because the set is paediatric consultations: a paediatric EHR knows that much about its patient.
"""

from __future__ import annotations

from collections.abc import Mapping

from knowledge.patient import PatientContext

FORMS = ("text", "list", "structured")


def findings(row: Mapping[str, object]) -> tuple[list[str], list[str]]:
    """(present, denied) symptoms of a row, explicit ones first, each once."""
    present: dict[str, None] = {}
    denied: dict[str, None] = {}
    for key in ("explicit_symptoms", "implicit_symptoms"):
        marks = row.get(key) or {}
        if isinstance(marks, Mapping):
            for name, mark in marks.items():
                (present if mark else denied)[str(name)] = None
    return list(present), [d for d in denied if d not in present]


def symptom_list_text(present: list[str], denied: list[str], subject: str = "患儿") -> str:
    """The findings as an EHR line: `患儿症状：咳嗽、咳痰；无发热、呕吐。`"""
    parts = []
    if present:
        parts.append(f"{subject}症状：" + "、".join(present))
    if denied:
        parts.append("无" + "、".join(denied))
    return "；".join(parts) + "。" if parts else ""


def as_form(row: Mapping[str, object], form: str) -> dict | None:
    """A case ({query, label_disease, ..., patient?}) in the given form; None when the row has no findings
    for a list form. Rows that carry their own `patient` (the EHR probes) keep their written query as the
    list form and their record as the structured form."""
    if form == "text":
        return {k: v for k, v in row.items() if k != "patient"}
    own = row.get("patient")
    if isinstance(own, Mapping):
        if form == "list":
            return {k: v for k, v in row.items() if k != "patient"}
        return {**row, "query": "", "patient": PatientContext.from_mapping(own)}
    present, denied = findings(row)
    if not present:
        return None
    if form == "list":
        return {**row, "query": symptom_list_text(present, denied)}
    return {**row, "query": "", "patient": PatientContext.from_fields(
        symptoms=present, negated_symptoms=denied, department="儿科")}
