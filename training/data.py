"""Dialogue readers (CMD CSV, JSONL {question, answer}, ChatDoctor {instruction, input, output}), cleaning, split.

Every reader returns the good examples plus a report: bad rows are counted by reason with their line numbers,
never raised, so one broken line in 100k does not stop a run.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

MAX_LINES_KEPT = 20  # line numbers kept per reason in a report


@dataclass
class Example:
    question: str
    answer: str
    source: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class ReadReport:
    path: str
    format: str = ""
    encoding: str = ""
    rows: int = 0
    kept: int = 0
    bad: Counter[str] = field(default_factory=Counter)
    bad_lines: dict[str, list[int]] = field(default_factory=dict)

    def reject(self, reason: str, line: int) -> None:
        self.bad[reason] += 1
        lines = self.bad_lines.setdefault(reason, [])
        if len(lines) < MAX_LINES_KEPT:
            lines.append(line)

    def summary(self) -> str:
        bad = ", ".join(f"{r}: {n} (lines {', '.join(map(str, self.bad_lines[r][:5]))}…)" for r, n in self.bad.items())
        return (f"{Path(self.path).name}: {self.format}, {self.encoding}, {self.rows} rows, {self.kept} kept"
                + (f"; bad rows — {bad}" if bad else ""))

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "format": self.format, "encoding": self.encoding, "rows": self.rows,
                "kept": self.kept, "bad": dict(self.bad), "bad_lines": self.bad_lines}


def detect_encoding(raw: bytes) -> str:
    """UTF-8 (with or without BOM) when it decodes, else GB18030 (a superset of GBK and GB2312)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    try:
        raw.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        raw.decode("gb18030")
        return "gb18030"
    except UnicodeDecodeError:
        return "gb18030-replace"  # mostly GB text with a few broken bytes: decode with U+FFFD, rows reported


def _decode(raw: bytes) -> tuple[str, str]:
    enc = detect_encoding(raw)
    if enc == "gb18030-replace":
        return raw.decode("gb18030", errors="replace"), enc
    return raw.decode(enc), enc


def _clean(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def _cmd_question(title: str, ask: str) -> str:
    """CMD's question is title + ask (ask alone when it already starts with the title), as in cmd_im.jsonl."""
    if not title or ask.startswith(title):
        return ask or title
    if not ask:
        return title
    return f"{title}，{ask}"


def read_cmd_csv(path: Path) -> tuple[list[Example], ReadReport]:
    """The CMD format: header `department,title,ask,answer`, GB18030/GBK or UTF-8."""
    report = ReadReport(path=str(path), format="cmd-csv")
    text, report.encoding = _decode(path.read_bytes())
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in next(reader, [])]
    examples: list[Example] = []
    if not {"ask", "answer"} <= set(header):
        report.reject("header without ask/answer columns", 1)
        return examples, report
    col = {name: header.index(name) for name in header}
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error:
            report.rows += 1
            report.reject("unparsable CSV", reader.line_num)
            continue
        report.rows += 1
        if not any(cell.strip() for cell in row):
            report.rows -= 1  # blank line, not a row
            continue
        if len(row) != len(header):
            report.reject(f"{len(row)} columns, expected {len(header)}", reader.line_num)
            continue
        title = _clean(row[col["title"]]) if "title" in col else ""
        question = _cmd_question(title, _clean(row[col["ask"]]))
        answer = _clean(row[col["answer"]])
        if "\ufffd" in question + answer:
            report.reject("undecodable bytes", reader.line_num)
            continue
        if not question or not answer:
            report.reject("empty question or answer", reader.line_num)
            continue
        examples.append(Example(question, answer, path.stem))
    report.kept = len(examples)
    return examples, report


def record_to_example(record: object, source: str) -> tuple[Example | None, str]:
    """{question, answer} or ChatDoctor {instruction, input, output}; returns (example, reason when bad)."""
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if "question" in record or "answer" in record:
        question, answer = _clean(record.get("question")), _clean(record.get("answer"))
    elif "output" in record:
        # ChatDoctor: `instruction` is the fixed role sentence, `input` the patient's words. The service's
        # prompt designer plays that role, so the patient's words alone are the question.
        question = _clean(record.get("input")) or _clean(record.get("instruction"))
        answer = _clean(record.get("output"))
    else:
        return None, "no question/answer or instruction/input/output fields"
    if not question or not answer:
        return None, "empty question or answer"
    return Example(question, answer, source), ""  # source = the file it came from (filterable)


def read_jsonl(path: Path) -> tuple[list[Example], ReadReport]:
    """JSON Lines, or a JSON array (the GenMedGPT-5k / alpaca files are arrays)."""
    report = ReadReport(path=str(path), format="jsonl")
    text, report.encoding = _decode(path.read_bytes())
    examples: list[Example] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        report.format = "json-array"
        try:
            records = list(enumerate(json.loads(stripped), start=1))
        except json.JSONDecodeError as exc:
            report.reject("invalid JSON array", exc.lineno)
            return examples, report
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError:
                report.rows += 1
                report.reject("invalid JSON", number)
    for number, record in records:
        report.rows += 1
        example, reason = record_to_example(record, path.stem)
        if example is None:
            report.reject(reason, number)
        else:
            examples.append(example)
    report.kept = len(examples)
    return examples, report


def read_any(path: Path) -> tuple[list[Example], ReadReport]:
    if path.suffix.lower() in (".csv", ".tsv"):
        return read_cmd_csv(path)
    return read_jsonl(path)


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Files as given; a directory means its *.jsonl, *.json and *.csv files (sorted). A raw CSV whose JSONL
    twin is also there (cmd_*.csv beside cmd_*.jsonl) would duplicate pairs; dedup removes those."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.suffix.lower() in (".jsonl", ".json", ".csv"))
        else:
            out.append(path)
    return out


@dataclass
class Prepared:
    train: list[Example]
    val: list[Example]
    reports: list[ReadReport]
    dropped: dict[str, int]


def clean(examples: list[Example], min_chars: int = 4, max_question_chars: int = 1000,
          max_answer_chars: int = 2000) -> tuple[list[Example], dict[str, int]]:
    """Exact deduplication on (question, answer) and length filtering (chars)."""
    seen: set[tuple[str, str]] = set()
    kept: list[Example] = []
    dropped: Counter[str] = Counter()
    for ex in examples:
        key = (ex.question, ex.answer)
        if key in seen:
            dropped["duplicate"] += 1
        elif len(ex.question) < min_chars or len(ex.answer) < min_chars:
            dropped["too short"] += 1
        elif len(ex.question) > max_question_chars or len(ex.answer) > max_answer_chars:
            dropped["too long"] += 1
        else:
            seen.add(key)
            kept.append(ex)
    return kept, dict(dropped)


def split(examples: list[Example], val_fraction: float = 0.05, seed: int = 42,
          max_val: int = 1000) -> tuple[list[Example], list[Example]]:
    """Seeded shuffle, then the first val_fraction (at least 1, at most max_val) is validation."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    n_val = min(max_val, max(1, round(len(order) * val_fraction))) if len(order) > 1 else 0
    return order[n_val:], order[:n_val]


def prepare(paths: Iterable[Path], val_fraction: float = 0.05, seed: int = 42, min_chars: int = 4,
            max_question_chars: int = 1000, max_answer_chars: int = 2000, limit: int = 0) -> Prepared:
    examples: list[Example] = []
    reports: list[ReadReport] = []
    for path in expand_paths(paths):
        found, report = read_any(path)
        examples += found
        reports.append(report)
    kept, dropped = clean(examples, min_chars, max_question_chars, max_answer_chars)
    if limit:
        random.Random(seed).shuffle(kept)
        kept = kept[:limit]
    train, val = split(kept, val_fraction, seed)
    return Prepared(train, val, reports, dropped)


def write_jsonl(examples: Iterable[Example], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for ex in examples:
            handle.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")


def load_examples(path: Path) -> list[Example]:
    """A prepared split (or any supported file) as examples; bad rows are skipped."""
    return read_any(path)[0]
