"""Lay-map keys matched on the complaint's text (a key the tokenizer splits still fires), negation intact."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowledge.search import Retriever
from knowledge.text import TextProcessor, lay_terms

# Older entries whose targets the library writes in prose only (流涕 reaches the lists via synonym links).
_PROSE_TARGETS = {"流涕", "眼分泌物", "眼痒", "胸", "脓涕"}


def test_split_key_is_found_on_the_text() -> None:
    tp = TextProcessor()
    assert "憋不住尿" not in tp.cut("最近憋不住尿")  # the per-token lookup could never see it
    qt = tp.query_terms("最近憋不住尿，还有点胃胀")
    assert qt.lay == ["憋不住尿", "胃胀"]
    assert "憋不住尿" not in qt.negated


def test_negated_key_is_denied_not_added() -> None:
    tp = TextProcessor()
    qt = tp.query_terms("没有憋不住尿，也没有胃胀")
    assert qt.lay == []
    assert {"憋不住尿", "胃胀"} <= set(qt.negated)
    # A negation ends at the clause: the key after the comma is the patient's.
    qt = tp.query_terms("没有发烧，憋不住尿")
    assert qt.lay == ["憋不住尿"]
    assert "发烧" in qt.negated


def test_longest_key_wins() -> None:
    qt = TextProcessor().query_terms("胸口剧痛")
    assert qt.lay == ["胸口剧痛"]  # not 胸口 and 剧痛


@pytest.fixture(scope="module")
def retriever(shared_data: Path, cache_dir: Path) -> Retriever:
    return Retriever.load_or_build(shared_data / "diseases.jsonl", cache_dir, progress=False, dialogues=False)


def test_split_key_reaches_the_search(retriever: Retriever) -> None:
    assert "尿失禁" in retriever.search("一咳嗽就漏尿").keywords
    assert "尿失禁" not in retriever.search("咳嗽，没有漏尿").keywords
    assert "震颤" in retriever.search("最近手抖得厉害").keywords


def test_targets_are_library_symptom_words(retriever: Retriever) -> None:
    targets = {t for ts in lay_terms().values() for t in ts}
    outside = {t for t in targets if not retriever._df("symptoms", t)}
    assert outside <= _PROSE_TARGETS
    # New targets that name an entry are symptoms many lists use (头痛, 晕厥), not diseases.
    named = {t for t in targets if t in retriever._name_rows and retriever._df("symptoms", t) < 20}
    assert named <= {"睡眠障碍"}
