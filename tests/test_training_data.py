"""Dialogue readers: encodings, formats, bad rows (counted with line numbers, never raised), clean and split."""

from __future__ import annotations

import json
from pathlib import Path

from training.data import detect_encoding, prepare, read_any, read_cmd_csv, read_jsonl, split

CSV_ROWS = [
    "department,title,ask,answer",
    "心血管科,高血压怎么办,高血压怎么办，最近头晕,建议低盐饮食，规律服药，监测血压。",
    "消化科,胃痛,饭后胃痛两周,可能是胃炎，建议做胃镜检查。",
    "神经科,头痛,,",  # line 4: empty ask and answer
    "肝病科,乙肝,乙肝小三阳要紧吗,定期复查肝功能和病毒载量。,多余的一列",  # line 5: 5 columns
    "消化科,胃痛,饭后胃痛两周,可能是胃炎，建议做胃镜检查。",  # duplicate of line 3
]


def write_csv(path: Path, encoding: str) -> Path:
    path.write_bytes(("\n".join(CSV_ROWS) + "\n").encode(encoding))
    return path


def test_cmd_csv_gb18030_detected_and_bad_rows_reported(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "cmd.csv", "gb18030")
    assert detect_encoding(path.read_bytes()) == "gb18030"
    examples, report = read_cmd_csv(path)
    assert report.encoding == "gb18030"
    assert report.rows == 5 and report.kept == 3
    assert report.bad_lines == {"empty question or answer": [4], "5 columns, expected 4": [5]}
    # ask already starts with the title: the question is the ask alone (as in cmd_im.jsonl)
    assert examples[0].question == "高血压怎么办，最近头晕"
    assert examples[1].question == "胃痛，饭后胃痛两周"
    assert "lines 4" in report.summary()


def test_cmd_csv_utf8_and_gbk_read_the_same(tmp_path: Path) -> None:
    a, _ = read_cmd_csv(write_csv(tmp_path / "u.csv", "utf-8"))
    b, report = read_cmd_csv(write_csv(tmp_path / "g.csv", "gbk"))
    assert [e.question for e in a] == [e.question for e in b] and report.encoding == "gb18030"


def test_csv_without_needed_columns_is_reported_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n", encoding="utf-8")
    examples, report = read_cmd_csv(path)
    assert examples == [] and report.bad


def test_jsonl_formats_and_bad_lines(tmp_path: Path) -> None:
    lines = [
        json.dumps({"question": "咳嗽怎么办", "answer": "多喝水，必要时就医。"}, ensure_ascii=False),
        "{not json",
        json.dumps({"instruction": "你是医生", "input": "我发烧了", "output": "先测体温，多休息。"},
                   ensure_ascii=False),
        json.dumps({"question": "", "answer": "x"}),
        json.dumps(["a list"]),
        "",
        json.dumps({"foo": 1}),
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    examples, report = read_jsonl(path)
    assert [(e.question, e.answer) for e in examples] == [("咳嗽怎么办", "多喝水，必要时就医。"),
                                                          ("我发烧了", "先测体温，多休息。")]
    assert report.bad_lines["invalid JSON"] == [2]
    assert report.bad_lines["empty question or answer"] == [4]
    assert report.bad_lines["not a JSON object"] == [5]
    assert report.bad_lines["no question/answer or instruction/input/output fields"] == [7]


def test_json_array_chatdoctor_in_gbk(tmp_path: Path) -> None:
    records = [{"instruction": "如果你是医生，请回答。", "input": "头痛三天", "output": "注意休息，持续不缓解请就诊。"}]
    path = tmp_path / "a.json"
    path.write_bytes(json.dumps(records, ensure_ascii=False).encode("gbk"))
    examples, report = read_any(path)
    assert report.format == "json-array" and report.encoding == "gb18030"
    assert examples[0].question == "头痛三天"


def test_prepare_dedups_filters_and_splits_with_a_seed(tmp_path: Path) -> None:
    write_csv(tmp_path / "cmd.csv", "gb18030")
    rows = [{"question": f"问题{i}：最近不舒服", "answer": f"回答{i}：建议就医检查。"} for i in range(40)]
    rows.append({"question": "短", "answer": "太短"})
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    prepared = prepare([tmp_path], val_fraction=0.1, seed=7)
    assert prepared.dropped == {"duplicate": 1, "too short": 1}
    assert len(prepared.train) + len(prepared.val) == 42 and len(prepared.val) == 4
    again = prepare([tmp_path], val_fraction=0.1, seed=7)
    assert [e.question for e in again.val] == [e.question for e in prepared.val]
    assert {e.question for e in prepared.train}.isdisjoint({e.question for e in prepared.val})
    train, val = split(prepared.train, 0.1, seed=8)
    assert len(val) == 4


def test_shared_raw_cmd_csv_reads(shared_data: Path) -> None:
    examples, report = read_cmd_csv(shared_data / "dialogues" / "cmd_sample_IM_5000-6000_utf8.csv")
    assert report.encoding == "utf-8" and report.rows > 7000
    assert report.kept + sum(report.bad.values()) == report.rows
    assert len(examples) > 7000
