"""Structured patient context, as an EHR sends it: age, sex, findings present and denied.

Retrieval reads it beside the free text: listed symptoms are scored as symptoms, denied ones count
against a disease that lists them, and age / sex replace the cue words guessed from the text. The HTTP
layer validates the fields (bounds, enum) and builds this; knowledge itself knows nothing of HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from knowledge.text import PatientCues, cue_words

CHILD_YEARS = 14  # the age below which the library's paediatric entries apply (as the text cues)
ADULT_YEARS = 18
ELDERLY_YEARS = 60


@dataclass(frozen=True)
class PatientContext:
    """What a record says about the patient; every field is optional."""

    age_months: float | None = None  # one age, in months (an EHR's years are converted)
    sex: str | None = None  # "female" / "male"
    symptoms: tuple[str, ...] = ()
    negated_symptoms: tuple[str, ...] = ()
    duration: str | None = None  # reported back; retrieval does not use it (no library field to match)
    department: str | None = None  # a paediatric department says the patient is a child

    @classmethod
    def from_fields(cls, *, age: float | None = None, age_months: float | None = None, sex: str | None = None,
                    symptoms: Sequence[str] = (), negated_symptoms: Sequence[str] = (),
                    duration: str | None = None, department: str | None = None) -> PatientContext:
        """Age in years or in months (months win when both are given: they are the finer one)."""
        months = age_months if age_months is not None else (age * 12 if age is not None else None)
        clean = tuple(dict.fromkeys(s.strip() for s in symptoms if s and s.strip()))
        denied = tuple(s for s in dict.fromkeys(s.strip() for s in negated_symptoms if s and s.strip())
                       if s not in clean)
        return cls(age_months=months, sex=sex, symptoms=clean, negated_symptoms=denied,
                   duration=(duration or "").strip() or None, department=(department or "").strip() or None)

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> PatientContext:
        """From a plain dict (a probe file row or a request's `patient`); unknown keys are ignored."""
        def strings(key: str) -> list[str]:
            value = data.get(key) or []
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else []

        def number(key: str) -> float | None:
            value = data.get(key)
            return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        sex = data.get("sex")
        return cls.from_fields(age=number("age"), age_months=number("age_months"),
                               sex=sex if sex in ("female", "male") else None,
                               symptoms=strings("symptoms"), negated_symptoms=strings("negated_symptoms"),
                               duration=str(data["duration"]) if data.get("duration") else None,
                               department=str(data["department"]) if data.get("department") else None)

    @property
    def is_empty(self) -> bool:
        return not (self.age_months is not None or self.sex or self.symptoms or self.negated_symptoms
                    or self.department)

    @property
    def paediatric_department(self) -> bool:
        return bool(self.department) and any(m in self.department for m in cue_words()["child_departments"])

    def apply_to(self, cues: PatientCues) -> PatientCues:
        """The text's cues with the record's facts put over them (a stated age beats a guessed one)."""
        out = PatientCues(child=cues.child, adult=cues.adult, elderly=cues.elderly, sex=cues.sex)
        if self.age_months is not None:
            years = self.age_months / 12
            out.child = years < CHILD_YEARS
            out.adult = years >= ADULT_YEARS
            out.elderly = years >= ELDERLY_YEARS
        elif self.paediatric_department:
            out.child, out.adult, out.elderly = True, False, False
        if self.sex:
            out.sex = self.sex
        return out

    def used(self) -> dict[str, object]:
        """What retrieval took from the record, for the response's meta (no free text beyond the lists)."""
        out: dict[str, object] = {}
        if self.age_months is not None:
            out["age_months"] = round(self.age_months, 1)
        if self.sex:
            out["sex"] = self.sex
        if self.symptoms:
            out["symptoms"] = list(self.symptoms)
        if self.negated_symptoms:
            out["negated_symptoms"] = list(self.negated_symptoms)
        if self.department:
            out["department"] = self.department
        return out
