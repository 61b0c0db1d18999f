"""The compiled/vectorised parts of retrieval give exactly what the plain reference computation gives.

Each fast path (rjieba segmentation, the aligned evidence table, the Aho-Corasick symptom scan and
evidence matcher, the regex body-part rewrite) is checked against a slow, obvious implementation on
the project's own sample library, so a speed-up can never silently change what the search returns.
"""

from __future__ import annotations

import json
import math
import random

import jieba
import numpy as np
import pytest

from knowledge.search import _MATCH_FIELDS, Retriever
from knowledge.text import DATA_DIR, body_parts, clinical_rewrite, normalise, split_compounds

SAMPLE_LIBRARY = DATA_DIR / "sample_diseases.jsonl"
SAMPLE_DIALOGUES = DATA_DIR / "sample_dialogues.jsonl"


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    return Retriever.load_or_build(SAMPLE_LIBRARY, tmp_path_factory.mktemp("cache"), progress=False)


def _texts() -> list[str]:
    docs = [json.loads(x) for x in SAMPLE_LIBRARY.read_text(encoding="utf-8").splitlines() if x.strip()]
    texts = [normalise(d.get("description", "") + "。" + "，".join(d.get("symptoms", []))) for d in docs]
    for line in SAMPLE_DIALOGUES.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            texts.extend(normalise(str(v)) for v in rec.values() if isinstance(v, str) and len(v) > 4)
    return texts


def test_rjieba_segments_exactly_like_python_jieba(sample: Retriever) -> None:
    proc = sample.index.text
    python_jieba = jieba.Tokenizer()
    python_jieba.initialize()
    for word in proc.user_words:
        python_jieba.add_word(word, proc.freq)
    texts = _texts()
    assert len(texts) > 200
    for text in texts:
        assert proc.segmenter.cut(text, False) == list(python_jieba.cut(text, HMM=False)), text
        assert proc.segmenter.cut_for_search(text, False) == list(python_jieba.cut_for_search(text, HMM=False))


def _reference_evidence(r: Retriever, weights: dict[str, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fielded BM25, coverage and symptom-word hits computed word by word from the three field indexes."""
    s, n = r.settings, r.size
    bm, cov, hits = np.zeros(n), np.zeros(n), np.zeros(n)
    total = 0.0
    for word, w in weights.items():
        all_rows = r._postings("all", word)
        if not len(all_rows):
            continue
        w_name = s.w_name / (1 + r._df("symptoms", word) / s.name_symptom_df)
        for fname, fw in (("name", w_name), ("symptoms", s.w_symptoms), ("prose", s.w_prose)):
            model = r.index.fields[fname]
            tid = model.vocab_dict.get(word)
            if tid is None:
                continue
            ip = model.scores["indptr"]
            for row, score in zip(model.scores["indices"][ip[tid]:ip[tid + 1]],
                                  model.scores["data"][ip[tid]:ip[tid + 1]], strict=True):
                bm[row] += w * fw * float(score)
        symptom_rows = set(r._postings("symptoms", word).tolist())
        if symptom_rows:
            idf = math.log(1 + n / (1 + len(all_rows)))
            total += w * idf
            for row in all_rows.tolist():
                share = s.coverage_symptom_share if row in symptom_rows else 0.0
                cov[row] += w * idf * (share + 1 - s.coverage_symptom_share)
                hits[row] += 1
    return bm, (cov / total if total else cov), hits


def test_evidence_table_equals_word_by_word_scoring(sample: Retriever) -> None:
    vocab = sorted(sample.index.fields["all"].vocab_dict)
    rng = random.Random(7)
    for _ in range(30):
        weights = {w: rng.choice([0.2, 0.5, 1.0, 1.7]) for w in rng.sample(vocab, 8)}
        weights["不存在的词"] = 1.0
        got = sample._evidence.score(weights)
        bm, cov, hits = _reference_evidence(sample, weights)
        np.testing.assert_allclose(got.bm25, bm, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.coverage, cov, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(got.symptom_hits, hits)


def test_symptom_scan_finds_every_vocabulary_substring(sample: Retriever) -> None:
    vocab = sample._symptom_vocab()
    assert vocab
    for text in _texts()[:150]:
        expected = {w for w in split_compounds(clinical_rewrite(text)) if w in vocab}
        for variant in (text, clinical_rewrite(text)):
            expected |= {variant[i:j] for i in range(len(variant)) for j in range(i + 2, min(i + 7, len(variant)) + 1)
                         if variant[i:j] in vocab}
        assert set(sample.scan_symptoms(text)) == expected, text


def test_regex_body_part_rewrite_equals_longest_match_walk() -> None:
    pairs = sorted(body_parts().items(), key=lambda kv: -len(kv[0]))

    def walk(text: str) -> str:
        out, i = [], 0
        while i < len(text):
            for k, v in pairs:
                if text.startswith(k, i):
                    out.append(v)
                    i += len(k)
                    break
            else:
                out.append(text[i])
                i += 1
        return "".join(out)

    for text in [*_texts()[:200], "小肚子疼，脚底板有红点，嗓子眼发痒", "脚脚底脚底板"]:
        assert clinical_rewrite(text) == walk(text)


def test_reference_evidence_matches_substring_search(sample: Retriever) -> None:
    for query in ["孩子发烧咳嗽三天，流鼻涕", "胃痛反酸，吃饭后加重", "皮肤起红疹很痒", "头痛恶心怕光"]:
        res = sample.search(query, k=5)
        assert res.hits
        for hit in res.hits:
            d = hit.disease
            texts = {f: normalise(d.name if f == "name" else d.section(f)) for f in _MATCH_FIELDS}
            assert hit.matched_keywords == [k for k in res.keywords if any(k in t for t in texts.values())]
            assert hit.matched_fields == [f for f in _MATCH_FIELDS
                                          if any(k in texts[f] for k in res.keywords)]


def test_index_cache_keeps_the_segmenter_settings(sample: Retriever) -> None:
    # The cached tokenizer state carries the user-word frequency it was built with.
    proc = sample.index.text
    assert proc.freq == sample.index.settings.user_word_freq
    assert proc.segmenter.cut(normalise(proc.user_words[0]), False) == [proc.user_words[0]]


def test_an_emergency_references_the_condition_its_rule_suspects(sample: Retriever) -> None:
    from llm.designer import PromptDesigner
    from safety.triage import Triage

    complaint = "男，60岁，突然胸口压榨样疼痛，出了一身冷汗，左胳膊发麻"
    triage = Triage.from_file()
    suspects = triage.assess(complaint).suspects
    assert {"急性心肌梗死", "心绞痛"} <= set(suspects)
    served = PromptDesigner(sample, triage=triage).design(complaint)
    assert served.references[0]["name"] in suspects and served.references[1]["name"] in suspects
    # Without an emergency nothing is suspected and ranking is retrieval's alone.
    calm = "鼻塞流清鼻涕两天，打喷嚏"
    assert not triage.assess(calm).suspects
    assert [r["id"] for r in PromptDesigner(sample, triage=triage).design(calm).references] == \
        [h.disease.id for h in sample.search(calm, k=3).hits]
