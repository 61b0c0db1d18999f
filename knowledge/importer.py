"""Normalise other disease-library shapes into the project's schema (knowledge.schema.Disease).

Known field spellings are mapped (e.g. diseases_39jk.jsonl: cure_rate, treat_cycle, body_part); a row that
cannot become a valid Disease is reported by its line number and skipped. Input: JSONL, a JSON list, or
a JSON object of records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from knowledge.schema import parse_record

# Other libraries' field names -> ours (first match wins).
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("id", "_id", "disease_id", "uid"),
    "name": ("name", "disease", "disease_name", "title", "名称", "疾病名称"),
    "aliases": ("aliases", "alias", "other_names", "别名"),
    "department": ("department", "cure_department", "departments", "科室", "就诊科室"),
    "description": ("description", "desc", "overview", "概述", "简介"),
    "symptoms": ("symptoms", "symptom", "症状", "典型症状"),
    "diagnosis": ("diagnosis", "diagnose", "诊断"),
    "causes": ("causes", "cause", "病因"),
    "treatment": ("treatment", "treat", "治疗"),
    "prevention": ("prevention", "prevent", "预防"),
    "checks": ("checks", "check", "检查"),
    "drugs": ("drugs", "common_drug", "recommand_drug", "药品"),
    "treat_way": ("treat_way", "cure_way", "治疗方式"),
    "complications": ("complications", "acompany", "并发症"),
    "susceptible_people": ("susceptible_people", "easy_get", "易感人群"),
    "prevalence": ("prevalence", "get_prob", "发病率"),
}


@dataclass
class ImportReport:
    source: Path
    output: Path
    written: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    duplicates: int = 0

    def summary(self) -> str:
        text = f"{self.source} -> {self.output}: {self.written} diseases written"
        if self.duplicates:
            text += f", {self.duplicates} duplicate names skipped"
        if self.errors:
            text += f", {len(self.errors)} bad rows (first: line {self.errors[0][0]}: {self.errors[0][1]})"
        return text


def _records(path: Path) -> list[tuple[int, object]]:
    """(line number, record) pairs; a JSON document counts as line 1 for each of its records."""
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and "\n{" not in stripped):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None
        if isinstance(doc, list):
            return [(i + 1, rec) for i, rec in enumerate(doc)]
        if isinstance(doc, dict):
            return [(i + 1, {"name": k, **v} if isinstance(v, dict) and "name" not in v else v)
                    for i, (k, v) in enumerate(doc.items())]
    out: list[tuple[int, object]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            out.append((number, ValueError(f"invalid JSON: {exc.msg}")))
    return out


def normalise_record(raw: dict, fallback_id: str) -> dict:
    """Map one foreign record onto our field names; unknown fields are kept as extras."""
    out: dict[str, object] = {}
    used: set[str] = set()
    for ours, names in FIELD_ALIASES.items():
        for name in names:
            if name in raw and raw[name] not in (None, "", []):
                out[ours] = raw[name]
                used.add(name)
                break
    if "treatment" not in out:  # thin libraries: build a short treatment line from the parts
        bits = [f"{label}：{raw[key]}" for key, label in (("treat_cycle", "治疗周期"), ("cure_rate", "治愈率"))
                if raw.get(key)]
        if bits:
            out["treatment"] = "；".join(bits) + "。"
    for key, value in raw.items():
        if key not in used and key not in out:
            out[key] = value
    out.setdefault("id", fallback_id)
    out["id"] = str(out["id"])
    return out


def import_library(source: Path, output: Path, id_prefix: str | None = None) -> ImportReport:
    """Convert `source` into a JSONL library at `output`; duplicate names keep the first copy."""
    report = ImportReport(source=source, output=output)
    prefix = id_prefix or source.stem
    seen_ids: set[str] = set()
    seen_names: set[str] = set()
    rows: list[str] = []
    for number, raw in _records(source):
        if isinstance(raw, Exception):
            report.errors.append((number, str(raw)))
            continue
        if not isinstance(raw, dict):
            report.errors.append((number, "not a JSON object"))
            continue
        record = normalise_record(raw, f"{prefix}-{number:05d}")
        if id_prefix and not str(record["id"]).startswith(id_prefix):
            record["id"] = f"{id_prefix}-{record['id']}"
        try:
            disease = parse_record(record)
        except ValueError as exc:
            report.errors.append((number, str(exc)))
            continue
        if disease.name in seen_names:
            report.duplicates += 1
            continue
        if disease.id in seen_ids:
            report.errors.append((number, f"duplicate id {disease.id}"))
            continue
        seen_ids.add(disease.id)
        seen_names.add(disease.name)
        rows.append(json.dumps(disease.model_dump(), ensure_ascii=False))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(rows) + ("\n" if rows else ""), encoding="utf-8")
    report.written = len(rows)
    return report
