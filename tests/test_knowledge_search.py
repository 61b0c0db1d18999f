"""Index build/cache and search on a tiny library written in a tmp dir (plus one shared-data check)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from knowledge.index import IndexSettings, LibraryIndex
from knowledge.search import Retriever, SearchSettings, _top

DOCS = [
    {"id": "d1", "name": "上呼吸道感染", "aliases": ["感冒"], "department": ["内科", "呼吸内科"],
     "description": "上呼吸道感染是鼻腔、咽或喉部急性炎症的总称。",
     "symptoms": ["发烧", "鼻塞", "流鼻涕", "咽痛", "咳嗽"],
     "diagnosis": "根据鼻咽部症状和体征可作出诊断。", "treatment": "对症治疗。", "prevention": "勤洗手。",
     "prevalence": "80%", "susceptible_people": "无特殊人群"},
    {"id": "d2", "name": "小儿腹泻病", "department": ["儿科"], "description": "小儿腹泻病是婴幼儿常见病。",
     "symptoms": ["腹泻", "呕吐", "发烧", "脱水"], "diagnosis": "大便性状改变，次数增多。", "prevalence": "28%",
     "susceptible_people": "婴幼儿"},
    {"id": "d3", "name": "偏头痛", "department": ["神经内科"], "description": "偏头痛是反复发作的头痛。",
     "symptoms": ["头痛", "恶心", "畏光"], "diagnosis": "反复发作的单侧搏动性头痛。", "prevalence": "5%",
     "susceptible_people": "中年女性"},
    {"id": "d4", "name": "急性膀胱炎", "department": ["泌尿外科"], "description": "膀胱的急性感染。",
     "symptoms": ["尿频", "尿急", "尿痛"], "diagnosis": "尿常规见白细胞。", "prevalence": "1%"},
    {"id": "d5", "name": "罕见鼻病", "description": "一种罕见病，鼻塞鼻塞鼻塞。", "symptoms": ["鼻塞"],
     "prevalence": "0.0001%"},
]


def write_library(path: Path, docs: list[dict] = DOCS) -> Path:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture()
def tiny(tmp_path: Path) -> Retriever:
    lib = write_library(tmp_path / "lib.jsonl")
    return Retriever.load_or_build(lib, tmp_path / "cache", progress=False)


def test_search_interface(tiny: Retriever) -> None:
    res = tiny.search("宝宝1岁，拉肚子还吐，有点发烧", k=3)
    assert res.hits and res.hits[0].disease.id == "d2"
    hit = res.hits[0].to_dict()
    assert set(hit) == {"id", "name", "score", "matched_keywords", "matched_fields"}
    assert "symptoms" in hit["matched_fields"] and hit["matched_keywords"]
    assert res.latency_ms > 0 and tiny.size == 5 and tiny.get("d3").name == "偏头痛"
    # Confident exactly when the best score leads the second by the margin (child cue: the child margin).
    scores = [h.score for h in tiny.search("宝宝1岁，拉肚子还吐，有点发烧", k=2).hits]
    assert res.confident == (scores[0] - scores[1] >= tiny.settings.confident_margin)
    strict = Retriever(tiny.index, SearchSettings(confident_margin=scores[0] - scores[1] + 1e-6))
    loose = Retriever(tiny.index, SearchSettings(confident_margin=scores[0] - scores[1] - 1e-6))
    assert not strict.search("宝宝1岁，拉肚子还吐，有点发烧").confident
    assert loose.search("宝宝1岁，拉肚子还吐，有点发烧").confident


def test_adult_queries(tiny: Retriever) -> None:
    assert tiny.search("尿频尿急尿痛两天").hits[0].disease.id == "d4"
    assert tiny.search("女，35岁，头痛，恶心，怕光").hits[0].disease.id == "d3"


def test_negation_changes_ranking(tiny: Retriever) -> None:
    res = tiny.search("没有腹泻，发烧鼻塞流鼻涕")
    assert res.hits[0].disease.id == "d1"
    assert "腹泻" in res.negated and "腹泻" not in res.keywords


def test_history_is_used_with_decay(tiny: Retriever) -> None:
    res = tiny.search("现在还是这样", history=["宝宝拉肚子，吐了两次"])
    assert res.hits and res.hits[0].disease.id == "d2"


def test_common_beats_rare_with_same_words(tiny: Retriever) -> None:
    assert tiny.search("鼻塞").hits[0].disease.id == "d1"


def test_cache_reused_and_invalidated(tmp_path: Path) -> None:
    lib = write_library(tmp_path / "lib.jsonl")
    cache = tmp_path / "cache"
    LibraryIndex.load_or_build(lib, cache, progress=False)
    assert len(list(cache.iterdir())) == 1
    start = time.perf_counter()
    LibraryIndex.load_or_build(lib, cache, progress=False)
    assert time.perf_counter() - start < 1.0
    assert len(list(cache.iterdir())) == 1  # loaded, not rebuilt
    LibraryIndex.load_or_build(lib, cache, IndexSettings(k1=1.2), progress=False)
    assert len(list(cache.iterdir())) == 2  # settings changed
    write_library(lib, DOCS[:4])
    os.utime(lib)
    idx = LibraryIndex.load_or_build(lib, cache, progress=False)
    assert len(list(cache.iterdir())) == 3 and idx.size == 4  # library changed


def test_plain_mode_equals_rank_bm25(tiny: Retriever) -> None:
    corpus = tiny.index.corpus_tokens()
    okapi = BM25Okapi(corpus, k1=1.5, b=0.75, epsilon=0)
    for q in ("发烧鼻塞", "头痛恶心", "尿频", "腹泻呕吐发烧"):
        tokens = tiny.plain_tokens(q)
        ours, ref = tiny.plain_scores(tokens), okapi.get_scores(tokens)
        assert list(_top(ours, 3)) == list(np.argsort(-ref, kind="stable")[:3])
    plain = Retriever(tiny.index, SearchSettings(mode="plain"))
    assert plain.search("尿频尿急").hits[0].disease.id == "d4"


def test_sample_library_if_present() -> None:
    sample = Path(__file__).resolve().parent.parent / "knowledge/data/sample_diseases.jsonl"
    if not sample.is_file():
        pytest.skip("sample library not written yet")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        r = Retriever.load_or_build(sample, Path(tmp), progress=False)
        res = r.search("咳嗽，发烧，流鼻涕")
        assert res.hits and r.size >= 10
        # Lay words and compounds reach the symptom vocabulary (only ['左臂'] survived before).
        chest = r.search("胸口剧痛，出冷汗，左臂发麻", k=3)
        assert {"胸痛", "冷汗", "出汗", "麻木"} <= set(chest.keywords)
        assert chest.hits[0].disease.name in {"心绞痛", "心肌梗死", "冠心病"}
        assert "胸痛" in chest.hits[0].matched_keywords


def test_symptom_scan_finds_compounds_and_lay_body_parts(tiny: Retriever) -> None:
    # 咽痛 is a symptom of one document only, so the scan vocabulary must admit df >= 1 here.
    r = Retriever(tiny.index, SearchSettings(scan_min_df=1))
    assert "咽痛" in r.scan_symptoms("嗓子疼得厉害")  # 嗓子 -> 咽, 疼 -> 痛
    assert "流鼻涕" in r.scan_symptoms("一直流鼻涕")
    assert "尿痛" in r.scan_symptoms("尿尿的时候疼，尿痛")
    assert "咽痛" not in r.scan_symptoms("嗓子疼", negated=["嗓子疼"])
    res = r.search("嗓子疼得厉害，鼻子不通")
    assert res.hits[0].disease.id == "d1" and "咽痛" in res.keywords


def test_negated_symptoms_not_rescanned(tiny: Retriever) -> None:
    res = tiny.search("头痛，没有发烧")
    assert "发烧" not in res.keywords and "发热" not in res.keywords


@pytest.mark.slow
def test_full_library_cached(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The 8,791-document library: cold build once (~15-45 s), then cached load <= 1 s."""
    if not os.environ.get("KNOWLEDGE_FULL_TESTS"):
        pytest.skip("set KNOWLEDGE_FULL_TESTS=1 to build the full index")
    cache = tmp_path_factory.mktemp("kcache")
    Retriever.load_or_build(shared_data / "diseases.jsonl", cache, progress=False)
    start = time.perf_counter()
    r = Retriever.load_or_build(shared_data / "diseases.jsonl", cache, progress=False)
    assert time.perf_counter() - start <= 1.0
    assert r.size == 8791 and r.search("尿频尿急尿痛").hits


def test_complication_mentions_prior(tmp_path: Path) -> None:
    """A disease that other documents list as a complication (by name or alias) outranks an equally
    matching one that nobody mentions, even when its prevalence string is tiny."""
    docs = [
        {"id": "c1", "name": "甲鼻病", "aliases": ["甲病"], "symptoms": ["鼻塞", "流涕"], "prevalence": "0.001%"},
        {"id": "c2", "name": "乙鼻病", "symptoms": ["鼻塞", "流涕"], "prevalence": "0.001%"},
        {"id": "c3", "name": "丙病", "symptoms": ["头痛"], "complications": ["甲鼻病"]},
        {"id": "c4", "name": "丁病", "symptoms": ["腹痛"], "complications": ["甲病", "甲鼻病"]},
        {"id": "c5", "name": "戊病", "symptoms": ["乏力"], "complications": ["乙鼻病"]},
        {"id": "c6", "name": "己病", "symptoms": ["咳嗽"], "complications": ["甲鼻病"]},
        {"id": "c7", "name": "庚病", "symptoms": ["发热"], "complications": ["庚病"]},  # itself: not counted
    ]
    r = Retriever.load_or_build(write_library(tmp_path / "lib.jsonl", docs), tmp_path / "cache", progress=False)
    mentions = dict(zip(r.index.meta.ids, r.index.meta.mentions.tolist(), strict=True))
    assert mentions["c1"] == 3 and mentions["c2"] == 1 and mentions["c7"] == 0
    assert [h.disease.id for h in r.search("鼻塞流涕", k=2).hits] == ["c1", "c2"]
    flat = Retriever(r.index, SearchSettings(w_mentions=0.0))
    scores = {h.disease.id: h.score for h in flat.search("鼻塞流涕", k=2).hits}
    assert scores["c1"] == pytest.approx(scores["c2"])


def test_named_disease_is_evidence(tiny: Retriever) -> None:
    res = tiny.search("头有点不舒服，是否是偏头痛？")
    assert res.hits and res.hits[0].disease.id == "d3"
    off = Retriever(tiny.index, SearchSettings(w_name_exact=0.0))
    assert res.hits[0].score > off.search("头有点不舒服，是否是偏头痛？").hits[0].score


def test_prose_only_words_weigh_less(tiny: Retriever) -> None:
    r = Retriever(tiny.index, SearchSettings(spec_min_df=1))
    assert r._specificity("总称") == 0.0  # only ever in prose: discourse, not a finding
    assert r._specificity("头痛") == 1.0  # a symptom-list word always counts
    assert tiny._specificity("总称") == 1.0  # too rare in a 5-document library to judge


def test_paediatric_flag(tiny: Retriever) -> None:
    flags = dict(zip(tiny.index.meta.ids, tiny.index.meta.child.tolist(), strict=True))
    assert flags == {"d1": False, "d2": True, "d3": False, "d4": False, "d5": False}


def test_prevalence_rates_in_other_notations() -> None:
    from knowledge.index import parse_prevalence

    assert parse_prevalence("0.001%-0.005%") == 0.005
    assert parse_prevalence("0.1％以下") == 0.1  # full-width percent sign
    assert parse_prevalence("31/10万") == pytest.approx(0.031)
    assert parse_prevalence("4‰") == pytest.approx(0.4)
    assert parse_prevalence("无相关数据") is None


def test_a_disease_named_as_a_past_event_gets_no_name_evidence(tiny: Retriever) -> None:
    asked = tiny._query("是不是感冒了，鼻塞", [])[2]
    before = tiny._query("感冒后一直鼻塞", [])[2]
    assert "感冒" in asked and "感冒" not in before


def test_priors_count_less_for_a_patient_not_known_to_be_a_child(tiny: Retriever) -> None:
    from knowledge.text import PatientCues

    rows = np.arange(tiny.size)
    adult, child = PatientCues(adult=True), PatientCues(child=True)
    scale = tiny.settings.prior_scale_without_child
    assert 0 < scale < 1
    np.testing.assert_allclose(tiny._all_priors(adult), scale * tiny._priors(rows, adult))
    np.testing.assert_allclose(tiny._all_priors(child), tiny._priors(rows, child))


def test_confidence_margin_depends_on_whether_the_patient_is_a_child(tmp_path: Path) -> None:
    lib = write_library(tmp_path / "lib.jsonl")
    index = LibraryIndex.load_or_build(lib, tmp_path / "cache", progress=False)
    strict_for_adults = Retriever(index, SearchSettings(confident_margin=0.0, confident_margin_without_child=100.0))
    child = strict_for_adults.search("宝宝1岁，发烧，鼻塞，流鼻涕")
    adult = strict_for_adults.search("女，35岁，发烧，鼻塞，流鼻涕")
    assert len(child.hits) > 1 and len(adult.hits) > 1
    assert child.cues["child"] and child.confident
    assert not adult.cues["child"] and not adult.confident


def test_progress_off_a_terminal_is_a_few_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    from knowledge.index import _progress

    bar = _progress(1000, "tokenising library", True)  # pytest's stderr is not a terminal
    for _ in range(1000):
        bar.update()
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") <= 2 and "1000/1000" in err
    silent = _progress(10, "x", False)
    silent.update()
    silent.close()
    assert capsys.readouterr().err == ""


def test_rank_fusion_for_patients_not_known_to_be_children(tiny: Retriever) -> None:
    off = Retriever(tiny.index, SearchSettings(fusion_depth=0))
    child_query = "宝宝1岁，拉肚子还吐，有点发烧"
    assert [h.score for h in tiny.search(child_query).hits] == [h.score for h in off.search(child_query).hits]
    query = "鼻塞，头痛，恶心"  # no child cue: fielded ranking and plain BM25 are fused
    fielded = [h.disease.id for h in off.search(query, k=5).hits]
    plain = tiny.plain_scores(tiny.plain_tokens(query))
    ids = tiny.index.meta.ids
    plain_rank = {ids[r]: int((plain > plain[r]).sum()) for r in range(tiny.size) if plain[r] > 0}
    expected = sorted(fielded, key=lambda d: -(1 / (61 + fielded.index(d)) + 1 / (61 + plain_rank.get(d, 10**6))))
    fused = tiny.search(query, k=5).hits
    assert [h.disease.id for h in fused] == expected
    scores = [h.score for h in fused]
    assert scores == sorted(scores, reverse=True) and scores[0] <= 2 / 61


SHORT_DOCS = [
    {"id": "s1", "name": "手足口病", "department": ["儿科"], "description": "手足口病是肠道病毒引起的传染病。",
     "symptoms": ["发热", "皮疹", "疱疹"], "diagnosis": "手、足、口腔出现疱疹。", "prevalence": "1%"},
    {"id": "s2", "name": "口腔炎", "department": ["口腔科"],
     "description": "口腔黏膜的炎症，可见疱疹，需与手足口病鉴别。",
     "symptoms": ["口腔溃疡", "疱疹", "发热"], "diagnosis": "口腔黏膜见溃疡。", "prevalence": "20%"},
    {"id": "s3", "name": "前列腺病", "description": "前列腺的疾病，如前列腺病、前列腺炎。", "symptoms": ["尿频"],
     "prevalence": "1%"},
    {"id": "s4", "name": "前列腺炎", "description": "前列腺的炎症，属前列腺病。", "symptoms": ["尿频", "尿痛"],
     "prevalence": "1%"},
    {"id": "s5", "name": "肛门瘙痒症", "description": "肛门周围瘙痒，肛门瘙痒症。", "symptoms": ["肛门瘙痒"],
     "prevalence": "1%"},
    {"id": "s6", "name": "吉普车病", "description": "骶尾部的藏毛窦。", "symptoms": ["骶尾部肿痛"], "prevalence": "1%"},
]


@pytest.fixture()
def short_named(tmp_path: Path) -> Retriever:
    return Retriever.load_or_build(write_library(tmp_path / "lib.jsonl", SHORT_DOCS), tmp_path / "cache",
                                   progress=False)


def test_a_name_written_without_its_suffix_names_the_disease(short_named: Retriever) -> None:
    query = "嘴里有疱疹，口腔溃疡，医生怀疑是手足口"
    assert "手足口病" in short_named._query(query, [])[2]
    assert short_named.search(query).hits[0].disease.id == "s1"
    without = Retriever(short_named.index)
    without._short_matcher = None  # the same search without the forms: the commoner 口腔炎 wins
    assert without.search(query).hits[0].disease.id == "s2"
    # Denied or told as a past event it names nothing, as a full name would not.
    assert "手足口病" not in short_named._query("没有手足口，嘴里有疱疹", [])[2]
    assert "手足口病" not in short_named._query("以前得过手足口，现在嘴里有疱疹", [])[2]
    assert "手足口病" not in short_named._query("得了手足口后一直有疱疹", [])[2]  # 后 marks the last token (口)
    # Named as a disease only after a naming word: a vaccine or a bare mention names nothing.
    assert "手足口病" not in short_named._query("上周打了手足口疫苗，嘴里有疱疹", [])[2]
    # Denied now, it cancels the name an earlier turn gave.
    assert "手足口病" not in short_named._query("查过了没有手足口，嘴里有疱疹", ["会不会是手足口"])[2]


def test_short_forms_leave_out_body_parts_symptoms_and_rare_names(short_named: Retriever) -> None:
    # 前列腺 opens 前列腺炎 too, 肛门瘙痒 is a symptom word, 吉普车病 is written by its own document only.
    assert short_named._short_names == {"手足口": ["手足口病"]}


def test_short_forms_of_the_full_library(shared_data: Path, cache_dir: Path) -> None:
    r = Retriever.load_or_build(shared_data / "diseases.jsonl", cache_dir, progress=False, dialogues=False)
    forms = r._short_names
    assert {"手足口", "梅尼埃", "精神分裂"} <= set(forms)
    assert not {"前列腺", "吉普车", "日本人", "染色体", "支气管", "放线菌", "曲霉菌"} & set(forms)
    # Whole tokens only: a form that starts or ends inside a word is no name, even after a naming word.
    for text in ("可能是产后目前的问题", "医生说是多发结节", "可能是糖尿病性心肌梗塞", "是食积胃口不好"):
        assert r.index.text.query_terms(text, r._short_matcher).name_forms == [], text
    # Ordinary words, lab values and organisms are no names: not after a naming word, nor as an organism.
    for text in ("孩子跳小舞蹈的时候摔了一跤", "体检红细胞原卟啉偏高", "面包长毛了，是曲霉菌吗", "牙齿里有放线菌吗"):
        assert r.index.text.query_terms(text, r._short_matcher).name_forms == [], text
    assert r.index.text.query_terms("医生说是梅尼埃", r._short_matcher).name_forms == ["梅尼埃"]


def test_every_probe_label_can_be_found_in_the_library(shared_data: Path) -> None:
    """Each probe case must have a library disease that counts as right under the evaluation's rule (its label
    or an also_correct name), or the probe measures a disease the search can never return."""
    from knowledge.evaluate import is_correct
    from knowledge.schema import load_library

    diseases = load_library(shared_data / "diseases.jsonl").diseases
    probes = Path(__file__).resolve().parent.parent / "knowledge" / "data" / "probes"
    missing = []
    for path in sorted(probes.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            case = json.loads(line)
            labels = (case["label_disease"], *case.get("also_correct", []))  # as evaluate() counts a hit
            if not any(is_correct(d, label) for d in diseases for label in labels):
                missing.append((path.name, case["label_disease"]))
    assert not missing, missing
