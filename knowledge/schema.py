"""The disease document schema and a validating JSONL loader."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# The four sections the prompt designer writes into a brief, in order.
BRIEF_SECTIONS = ("symptoms", "diagnosis", "treatment", "prevention")


class Disease(BaseModel):
    """One disease document (the shape of shared/data/diseases.jsonl; extra fields are kept)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    department: list[str] = Field(default_factory=list)
    description: str = ""
    symptoms: list[str] = Field(default_factory=list)
    diagnosis: str = ""
    treatment: str = ""
    prevention: str = ""
    causes: str = ""
    checks: list[str] = Field(default_factory=list)
    drugs: list[str] = Field(default_factory=list)
    treat_way: list[str] = Field(default_factory=list)
    complications: list[str] = Field(default_factory=list)
    susceptible_people: str = ""
    prevalence: str = ""

    @field_validator("aliases", "department", "symptoms", "checks", "drugs", "treat_way", "complications",
                     mode="before")
    @classmethod
    def _split_strings(cls, value: object) -> object:
        # Some libraries store lists as "a,b,c" strings; None means empty.
        if value is None:
            return []
        if isinstance(value, str):
            return [p.strip() for p in value.replace("，", ",").split(",") if p.strip()]
        return value

    @field_validator("description", "diagnosis", "treatment", "prevention", "causes", "susceptible_people",
                     "prevalence", mode="before")
    @classmethod
    def _none_to_empty(cls, value: object) -> object:
        if value is None:
            return ""
        if isinstance(value, list):
            return "，".join(str(v) for v in value)
        return value

    @field_validator("name")
    @classmethod
    def _strip_name(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("name is blank")
        return value

    def section(self, name: str) -> str:
        """A section as plain text (lists joined with the Chinese enumeration comma)."""
        value = getattr(self, name, "")
        if isinstance(value, list):
            return "、".join(value)
        return str(value or "")


@dataclass
class LoadReport:
    """What the loader kept and what it rejected (line numbers are 1-based)."""

    path: Path
    diseases: list[Disease] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    duplicates: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.path}: {len(self.diseases)} diseases"
        if self.errors:
            text += f", {len(self.errors)} bad lines (first: line {self.errors[0][0]}: {self.errors[0][1]})"
        if self.duplicates:
            text += f", {len(self.duplicates)} duplicate ids skipped"
        return text


class LibraryError(ValueError):
    """The library cannot be used at all (missing, unreadable, or no valid document)."""


def parse_record(record: object) -> Disease:
    """One library record as a Disease; ValueError with the first problem (field: message) otherwise."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    try:
        return Disease.model_validate(record)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "record"
        raise ValueError(f"{where}: {first['msg']}") from None


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, f"\x00bad-utf8:{exc.reason}"


def load_library(path: str | Path) -> LoadReport:
    """Read a JSONL library. Bad lines are reported by number, never fatal unless nothing is valid."""
    path = Path(path)
    if not path.is_file():
        raise LibraryError(f"knowledge library not found: {path} (set DOCTORGLM_KNOWLEDGE_PATH)")
    report = LoadReport(path=path)
    seen: set[str] = set()
    try:
        lines = list(_iter_lines(path))
    except OSError as exc:
        raise LibraryError(f"cannot read knowledge library {path}: {exc}") from exc
    for number, line in lines:
        if not line.strip():
            continue
        if line.startswith("\x00bad-utf8:"):
            report.errors.append((number, "not UTF-8 text"))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            report.errors.append((number, f"invalid JSON: {exc.msg}"))
            continue
        try:
            disease = parse_record(record)
        except ValueError as exc:
            report.errors.append((number, str(exc)))
            continue
        if disease.id in seen:
            report.duplicates.append((number, disease.id))
            continue
        seen.add(disease.id)
        report.diseases.append(disease)
    if not report.diseases:
        raise LibraryError(f"no valid disease documents in {path}: {report.summary()}")
    return report
