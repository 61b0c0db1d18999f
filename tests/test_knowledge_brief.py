"""Briefs fit the budget and cut only at sentence ends; the evaluator rule; the importer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knowledge.brief import sentences, write_brief, write_candidates
from knowledge.evaluate import evaluate, is_correct
from knowledge.importer import import_library
from knowledge.schema import Disease, load_library
from knowledge.search import Hit

D = Disease(id="x1", name="小儿急性上呼吸道感染", aliases=["小儿感冒"], symptoms=["发热", "鼻塞", "咳嗽"],
            description="这是一种常见病。多由病毒引起！", diagnosis="依据症状诊断。必要时查血常规；结合病史。",
            treatment="对症治疗为主。注意休息。", prevention="勤洗手，\n少去人多的地方\n接种疫苗。")


@pytest.mark.parametrize("budget", [10, 40, 60, 90, 120, 200, 1000])
def test_brief_fits_budget_and_keeps_whole_sentences(budget: int) -> None:
    brief = write_brief(D, budget)
    assert len(brief.text) <= budget
    all_sentences = set()
    for field in ("description", "diagnosis", "treatment", "prevention"):
        all_sentences.update(sentences(getattr(D, field)))
    for line in brief.text.splitlines()[1:]:
        body = line.split("：", 1)[1]
        if body.startswith("常见症状"):
            continue
        for sent in sentences(body):
            assert sent in all_sentences, sent
    if budget >= 200:
        assert brief.sections == ["symptoms", "diagnosis", "treatment", "prevention"]
        assert brief.disease_ids == ["x1"]


def test_candidates_brief() -> None:
    other = Disease(id="x2", name="过敏", symptoms=["喷嚏"])
    brief = write_candidates([Hit(D, 1.0), Hit(other, 0.9)], 200)
    assert "不能确定" in brief.text and brief.disease_ids == ["x1", "x2"] and len(brief.text) <= 200
    assert len(write_candidates([Hit(D, 1.0)], 5).text) <= 5


@pytest.mark.parametrize(("name", "aliases", "label", "ok"), [
    ("小儿急性上呼吸道感染", [], "上呼吸道感染", True),
    ("上呼吸道感染", [], "上呼吸道感染", True),
    ("小儿腹泻病", [], "小儿腹泻", True),  # via the label map
    ("婴幼儿腹泻", [], "小儿腹泻", True),  # prefixes stripped on both sides
    ("新生儿肺炎", [], "肺炎", True),
    ("急性支气管炎", [], "肺炎", False),
    ("病毒性感冒", ["伤风"], "上呼吸道感染", False),
    ("某病", ["手足口病"], "小儿手足口病", True),  # alias equals the mapped name
])
def test_correctness_rule(name: str, aliases: list[str], label: str, ok: bool) -> None:
    label_map = {"小儿腹泻": "小儿腹泻病", "小儿手足口病": "手足口病"}
    assert is_correct(Disease(id="z", name=name, aliases=aliases), label, label_map) is ok


class _FakeRetriever:
    def __init__(self, ranked: list[Disease]) -> None:
        self.ranked = ranked

    def search(self, query: str, history=(), k: int = 5):
        from knowledge.search import SearchResult

        return SearchResult(query=query, keywords=[], hits=[Hit(d, 1.0 - i / 10) for i, d in
                                                            enumerate(self.ranked[:k])],
                            confident=False, latency_ms=0.1)


def test_evaluate_metrics(tmp_path: Path) -> None:
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps({"query": q, "label_disease": lab}, ensure_ascii=False)
                              for q, lab in [("a", "肺炎"), ("b", "偏头痛")]), encoding="utf-8")
    ranked = [Disease(id="1", name="偏头痛"), Disease(id="2", name="小儿肺炎")]
    out = evaluate(_FakeRetriever(ranked), data, None)
    assert out["n"] == 2 and out["top1"] == 0.5 and out["top5"] == 1.0 and out["mrr"] == 0.75
    assert out["worst_misses"] == []


def test_importer_reports_bad_rows(tmp_path: Path) -> None:
    src = tmp_path / "other.jsonl"
    rows = [
        json.dumps({"id": "a1", "name": "阳痿", "aliases": ["勃起功能障碍"], "body_part": ["阴茎"],
                    "symptoms": ["勃起困难"], "treat_cycle": "1-2个月", "cure_rate": "85%"}, ensure_ascii=False),
        "{not json",
        json.dumps({"id": "a3", "name": "  "}),
        json.dumps(["a list"]),
        json.dumps({"id": "a5", "name": "乙肝", "symptoms": "乏力,肝区不适"}, ensure_ascii=False),
    ]
    src.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "lib.jsonl"
    report = import_library(src, out)
    assert report.written == 2
    assert [n for n, _ in report.errors] == [2, 3, 4]
    lib = load_library(out)
    assert [d.name for d in lib.diseases] == ["阳痿", "乙肝"]
    assert lib.diseases[0].treatment.startswith("治疗周期") and lib.diseases[1].symptoms == ["乏力", "肝区不适"]
