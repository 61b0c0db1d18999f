"""The dialogue view (knowledge/dialogue_view.py) on a tiny library and dialogues written here."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from knowledge.__main__ import main
from knowledge.dialogue_view import (
    DialogueView,
    NameMatcher,
    default_folder,
    dialogues_hash,
    is_held_out,
    label,
    lay_dev_cases,
    view_terms,
)
from knowledge.search import Retriever, SearchSettings

DOCS = [
    {"id": "g1", "name": "功能性消化不良", "aliases": ["消化不良"], "description": "功能性消化不良是常见的胃肠功能病。",
     "symptoms": ["上腹痛", "腹胀", "早饱"], "diagnosis": "上腹部症状反复发作。"},
    {"id": "g2", "name": "胃溃疡", "aliases": ["消化性溃疡"], "description": "胃黏膜的溃疡。",
     "symptoms": ["上腹痛", "反酸", "黑便"], "diagnosis": "胃镜见溃疡。"},
    {"id": "g3", "name": "冠心病", "description": "冠状动脉粥样硬化引起的心脏病。", "symptoms": ["胸痛", "胸闷"],
     "diagnosis": "心电图改变。"},
    {"id": "g4", "name": "偏头痛", "description": "反复发作的头痛。", "symptoms": ["头痛", "恶心"],
     "diagnosis": "单侧搏动性头痛。"},
    {"id": "g5", "name": "急性膀胱炎", "description": "膀胱的急性感染。", "symptoms": ["尿频", "尿急", "尿痛"],
     "diagnosis": "尿常规见白细胞。"},
    {"id": "g6", "name": "过敏性鼻炎", "description": "鼻黏膜的过敏性炎症。", "symptoms": ["鼻塞", "打喷嚏", "流鼻涕"],
     "diagnosis": "过敏原检测。"},
]
# Patients' own words for three diseases; 胀鼓鼓 is in no document of the library.
DIALOGUES = (
    [{"question": f"医生，我上腹痛，肚子胀鼓鼓的，第{i}天了", "answer": "你可能患有胃溃疡，建议做胃镜。"}
     for i in range(12)]
    + [{"question": f"这{i}天胸口闷得慌，喘不上气", "answer": "考虑冠心病，请做心电图。"} for i in range(8)]
    + [{"question": f"早上起来一直打喷嚏，鼻子痒痒的{i}", "answer": "这是过敏性鼻炎。"} for i in range(8)]
)
COMPLAINT = "上腹痛，肚子胀鼓鼓的"  # the library alone ties 功能性消化不良 and 胃溃疡 (first row wins)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def library(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "lib.jsonl", DOCS)


@pytest.fixture()
def with_dialogues(library: Path) -> Path:
    write_jsonl(library.parent / "dialogues" / "talks.jsonl", DIALOGUES)
    return library


def matcher() -> NameMatcher:
    names = ["功能性消化不良", "胃溃疡", "发烧", "胃炎", "慢性胃炎"]
    rows = {"功能性消化不良": [0], "消化不良": [0], "胃溃疡": [1], "消化性溃疡": [1], "发烧": [2], "胃炎": [3],
            "慢性胃炎": [4]}
    return NameMatcher(rows, names, [False, False, True, False, False])


def test_a_name_in_the_answer_labels_the_question() -> None:
    m = matcher()
    assert label({"question": "吃完饭就胀", "answer": "你可能患有功能性消化不良。"}, m) == 0
    assert label({"question": "吃完饭就胀", "answer": "是消化性溃疡，需要胃镜。"}, m) == 1  # alias
    # Longest match: 慢性胃炎 is one disease, not 胃炎 inside it.
    assert label({"question": "胃疼", "answer": "这是慢性胃炎。"}, m) == 4
    # The diagnosis outweighs a disease mentioned in passing, even mentioned twice.
    assert label({"question": "胃疼", "answer": "胃溃疡和胃溃疡的区别不大，你考虑胃炎"}, m) == 3
    assert label({"question": "胃疼", "answer": "多喝水。"}, m) is None
    # The question's own title and guess count when the answer names nothing.
    assert label({"question": "胃疼，是不是胃溃疡？", "answer": "先做检查。"}, m) == 1
    assert label({"question": "胃疼", "title": "胃炎怎么办", "answer": "先做检查。"}, m) == 3


def test_negated_mentions_and_bare_symptom_entries_label_nothing() -> None:
    m = matcher()
    assert label({"question": "胃疼", "answer": "不是胃溃疡，放心。"}, m) is None
    assert label({"question": "胃疼", "answer": "排除胃溃疡，考虑功能性消化不良。"}, m) == 0
    assert label({"question": "孩子发烧", "answer": "发烧要多喝水。"}, m) is None  # entry named after a symptom
    # The negation reaches back within its clause only.
    assert label({"question": "胃疼", "answer": "没有大问题，胃溃疡可能性大。"}, m) == 1


def test_the_split_is_stable_and_holds_out_a_fifth() -> None:
    questions = [f"第{i}个问题：肚子疼怎么办" for i in range(2000)]
    held = [q for q in questions if is_held_out(q)]
    assert held == [q for q in questions if is_held_out(q)]  # same answer every call (no salted hash)
    assert 0.15 < len(held) / len(questions) < 0.25
    assert is_held_out(" 肚子疼怎么办 ") == is_held_out("肚子疼怎么办")  # normalised text


def test_view_cached_and_keyed_by_the_dialogue_files(with_dialogues: Path, tmp_path: Path) -> None:
    folder = with_dialogues.parent / "dialogues"
    assert default_folder(with_dialogues) == folder.resolve()
    cache = tmp_path / "cache"
    first = Retriever.load_or_build(with_dialogues, cache, progress=False)
    assert first.view is not None and first.view.counts.sum() > 0
    before = dialogues_hash(folder)
    assert len(list(cache.glob("dialogues-*"))) == 1
    Retriever.load_or_build(with_dialogues, cache, progress=False)
    assert len(list(cache.glob("dialogues-*"))) == 1  # loaded, not rebuilt
    new = "头一跳一跳地疼"
    assert not is_held_out(new)  # a training question
    write_jsonl(folder / "more.jsonl", [{"question": new, "answer": "可能是偏头痛。"}])
    assert dialogues_hash(folder) != before
    again = Retriever.load_or_build(with_dialogues, cache, progress=False)
    assert len(list(cache.glob("dialogues-*"))) == 2
    assert first.view.counts[3] == 0
    assert again.view is not None and again.view.counts[3] == 1


def test_held_out_questions_never_enter_the_view(with_dialogues: Path, tmp_path: Path) -> None:
    only_held_out = {"question": "嗓子像冒火", "answer": "这是过敏性鼻炎。"}  # 冒火: no other question says it
    assert is_held_out(only_held_out["question"])
    write_jsonl(with_dialogues.parent / "dialogues" / "more.jsonl", [only_held_out])
    r = Retriever.load_or_build(with_dialogues, tmp_path / "cache", progress=False)
    assert r.view is not None and r.view.model is not None
    assert "冒火" in view_terms(r, only_held_out["question"])  # it would be a patients' word if trained on
    assert "冒火" not in r.view.model.vocab_dict
    held = [d["question"] for d in [*DIALOGUES, only_held_out] if is_held_out(d["question"])]
    assert sorted(c["query"] for c in r.view.dev) == sorted(held)
    assert int(r.view.counts.sum()) == len(DIALOGUES) + 1 - len(held)
    # The lay eval set: held-out questions that do not name their own disease (none of these do).
    assert len(lay_dev_cases(r.view, r.index.meta.names, r.index.meta.aliases)) == len(held)
    loaded = DialogueView.load(next((tmp_path / "cache").glob("dialogues-*")))
    assert np.array_equal(loaded.counts, r.view.counts) and loaded.dev == r.view.dev


def test_patients_words_move_the_ranking_their_way(with_dialogues: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    plain = Retriever.load_or_build(with_dialogues, cache, progress=False, dialogues=False)
    heard = Retriever.load_or_build(with_dialogues, cache, progress=False)
    assert plain.view is None and heard.view is not None

    def lead(r: Retriever) -> float:  # score of 胃溃疡 minus 功能性消化不良
        scores = {h.disease.id: h.score for h in Retriever(r.index, SearchSettings(fusion_depth=0), r.view)
                  .search(COMPLAINT).hits}
        return scores["g2"] - scores["g1"]

    assert plain.search(COMPLAINT).hits[0].disease.id == "g1"
    assert heard.search(COMPLAINT).hits[0].disease.id == "g2"
    assert lead(heard) > lead(plain)
    off = Retriever(heard.index, SearchSettings(w_view_words=0.0), heard.view)
    assert off.search(COMPLAINT).hits[0].disease.id == "g1"
    # Children too (parents ask the dialogue doctors), without the fusion adults get.
    child = "宝宝3岁，" + COMPLAINT

    def child_lead(r: Retriever) -> float:
        scores = {h.disease.id: h.score for h in r.search(child).hits}
        return scores["g2"] - scores["g1"]

    assert child_lead(heard) > child_lead(plain)


def test_no_dialogues_folder_means_no_view(library: Path, tmp_path: Path) -> None:
    assert default_folder(library) is None
    assert Retriever.load_or_build(library, tmp_path / "cache", progress=False).view is None


def test_the_view_never_makes_a_child_s_search_confident(with_dialogues: Path, tmp_path: Path) -> None:
    heard = Retriever.load_or_build(with_dialogues, tmp_path / "cache", progress=False)
    none = Retriever.load_or_build(with_dialogues, tmp_path / "cache", progress=False, dialogues=False)
    assert heard.view is not None and none.view is None
    moved = 0
    for q in (COMPLAINT, "胸口闷得慌，胸闷", "打喷嚏，鼻子痒痒的", "尿频尿急"):
        a, b = heard.search("宝宝3岁，" + q), none.search("宝宝3岁，" + q)
        moved += [h.score for h in a.hits] != [h.score for h in b.hits]
        assert not a.confident or b.confident  # it may take confidence away, never give it
    assert moved  # the view is on for children


def test_lines_that_are_not_utf8_are_skipped(with_dialogues: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    clean = Retriever.load_or_build(with_dialogues, tmp_path / "a", progress=False)
    gbk = json.dumps({"question": "头一跳一跳地疼", "answer": "可能是偏头痛。"}, ensure_ascii=False).encode("gbk")
    (with_dialogues.parent / "dialogues" / "export.jsonl").write_bytes(gbk + b"\n")
    with caplog.at_level(logging.WARNING, logger="knowledge.dialogue_view"):
        r = Retriever.load_or_build(with_dialogues, tmp_path / "b", progress=False)
    assert clean.view is not None and r.view is not None
    assert np.array_equal(r.view.counts, clean.view.counts)
    assert "export.jsonl: 1 lines skipped" in caplog.text


def test_a_view_that_cannot_be_saved_is_left_out(with_dialogues: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    base = Retriever.load_or_build(with_dialogues, cache, progress=False, dialogues=False)
    assert base.index.directory is not None
    target = cache / f"dialogues-{base.index.directory.name}-{dialogues_hash(with_dialogues.parent / 'dialogues')}"
    # A file where the view's temporary folder must go: the save fails, as on a read-only cache.
    target.with_name(target.name + f".tmp{os.getpid()}").write_text("in the way")
    with caplog.at_level(logging.WARNING, logger="knowledge.search"):
        r = Retriever.load_or_build(with_dialogues, cache, progress=False)
    assert r.view is None and "dialogue view from" in caplog.text
    assert [h.disease.id for h in r.search(COMPLAINT).hits] == [h.disease.id for h in base.search(COMPLAINT).hits]


def test_cli_rejects_missing_or_empty_dialogue_folders(with_dialogues: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    common = ["--library", str(with_dialogues), "--cache-dir", str(tmp_path / "cache")]
    assert main(["build", *common, "--dialogues", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["eval", *common, "--data", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "no dialogue files" in capsys.readouterr().err
    folder = str(with_dialogues.parent / "dialogues")
    assert main(["eval", *common, "--data", folder, "--dialogues", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "--dialogues may only be auto or none" in capsys.readouterr().err
    assert main(["eval", *common, "--data", folder, "--quiet"]) == 0
    assert "top-1=" in capsys.readouterr().out


def test_confidence_reads_the_library_evidence_alone(with_dialogues: Path, tmp_path: Path) -> None:
    r = Retriever.load_or_build(with_dialogues, tmp_path / "cache", progress=False)
    loud = Retriever(r.index, SearchSettings(w_view_words=10.0, fusion_depth=0), r.view)
    res = loud.search(COMPLAINT)
    assert res.hits[0].disease.id == "g2" and res.hits[0].score - res.hits[1].score > 5
    assert not res.confident  # the library ties 胃溃疡 and 功能性消化不良: the patients' words do not settle it


# 慢性胃炎 is as close to 胃溃疡 as the library can tell; 冠心病 shares one word (胸闷) with the complaint
# below, and its patients' words (胸口闷得慌) lift it into second place.
GASTRITIS = {"id": "g7", "name": "慢性胃炎", "description": "胃黏膜的慢性炎症。",
             "symptoms": ["上腹痛", "反酸", "黑便", "嗳气"], "diagnosis": "胃镜见炎症。"}
STOMACH_AND_CHEST = "上腹痛，反酸，黑便，胸闷，胸口闷得慌"


def test_the_view_never_makes_a_fused_search_confident(tmp_path: Path) -> None:
    lib = write_jsonl(tmp_path / "lib.jsonl", [*DOCS, GASTRITIS])
    write_jsonl(tmp_path / "dialogues" / "talks.jsonl", DIALOGUES)
    r = Retriever.load_or_build(lib, tmp_path / "cache", progress=False)
    # Fusion on (the default depth); a low margin, so that the library's lead over the weak third counts.
    settings = SearchSettings(w_view_words=1.0, confident_margin_without_child=0.3)
    heard, alone = Retriever(r.index, settings, r.view), Retriever(r.index, settings)
    res, lib_only = heard.search(STOMACH_AND_CHEST), alone.search(STOMACH_AND_CHEST)
    assert "g3" in [h.disease.id for h in res.hits[:2]]  # the view lifts 冠心病 into the first two
    assert [h.disease.id for h in lib_only.hits[:3]] == ["g2", "g7", "g3"]  # the library: a close second, 冠心病 third
    assert not lib_only.confident
    assert not res.confident  # the margin is the library's own (against 慢性胃炎), whatever the view lifts
    claimed = 0
    for q in (STOMACH_AND_CHEST, "上腹痛，黑便，胸口闷得慌", COMPLAINT, "胸闷，喘不上气", "打喷嚏，鼻子痒痒的",
              "上腹痛，反酸，胸闷", "尿频尿急，胸口闷得慌"):
        with_view = heard.search(q).confident
        claimed += with_view
        assert not with_view or alone.search(q).confident, q
    assert claimed  # the rule still lets the library's clear leads through


def test_the_service_setting_strings(with_dialogues: Path, tmp_path: Path) -> None:
    folder = with_dialogues.parent / "dialogues"
    cache = tmp_path / "cache"
    auto = Retriever.load_or_build(with_dialogues, cache, progress=False, dialogues="auto")
    assert auto.view is not None and auto.view.folder == folder.resolve()
    assert Retriever.load_or_build(with_dialogues, cache, progress=False, dialogues="none").view is None
    given = Retriever.load_or_build(with_dialogues, cache, progress=False, dialogues=str(folder))
    assert given.view is not None and given.view.folder == folder
    assert Retriever.load_or_build(with_dialogues, cache, progress=False, dialogues=str(tmp_path / "no")).view is None


def test_the_view_cache_is_keyed_by_the_library_content(tmp_path: Path) -> None:
    from knowledge.index import IndexSettings, LibraryIndex

    folder = write_jsonl(tmp_path / "talks" / "t.jsonl", DIALOGUES).parent
    cache = tmp_path / "cache"
    views = []
    for sub, docs in (("a", DOCS), ("b", DOCS[:-1])):  # the same file name, other content
        index = LibraryIndex.build(write_jsonl(tmp_path / sub / "lib.jsonl", docs), IndexSettings(), progress=False)
        assert index.directory is None  # not from the index cache: the key must still hold the library hash
        views.append(DialogueView.load_or_build(index, folder, cache, progress=False))
    assert views[0].key != views[1].key and len(list(cache.glob("dialogues-*"))) == 2
