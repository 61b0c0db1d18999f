"""Retrieval accuracy on labelled complaints ({query, label_disease} JSONL): top-1, top-5, MRR, misses.

The correctness rule (issue 9): a retrieved disease is correct when it is the label or the label's
mapped name (or has either among its aliases), or when its name or an alias, with the age prefixes
removed, contains the label or its mapped name with those prefixes removed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from knowledge.schema import Disease
from knowledge.symptom_sets import as_form
from knowledge.text import strip_age


def label_targets(label: str, label_map: dict[str, str]) -> list[str]:
    targets = [label]
    mapped = label_map.get(label)
    if mapped and mapped != label:
        targets.append(mapped)
    return targets


def is_correct(disease: Disease, label: str, label_map: dict[str, str] | None = None) -> bool:
    targets = label_targets(label, label_map or {})
    names = [disease.name, *disease.aliases]
    if any(n == t for n in names for t in targets):
        return True
    stripped_targets = [strip_age(t) for t in targets]
    return any(st and st in strip_age(n) for n in names for st in stripped_targets)


def load_label_map(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    return {k: v for k, v in raw.items() if not k.startswith("_") and isinstance(v, str)}


def load_cases(path: Path) -> list[dict]:
    cases = []
    with Path(path).open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if not (rec.get("query") or rec.get("patient")) or not rec.get("label_disease"):
                raise ValueError(f"{path}:{number}: needs 'query' (or 'patient') and 'label_disease'")
            cases.append(rec)
    return cases


def split_half(cases: Sequence[dict], part: str, seed: int = 9) -> list[dict]:
    """Deterministic half split ('a' to tune, 'b' held out; 'all' = everything)."""
    if part == "all":
        return list(cases)
    order = list(range(len(cases)))
    random.Random(seed).shuffle(order)
    half = set(order[: len(order) // 2])
    return [c for i, c in enumerate(cases) if (i in half) == (part == "a")]


def evaluate(retriever, jsonl_path: Path | str | Sequence[dict], label_map_path: Path | str | None = None,
             k: int = 5, split: str = "all", form: str = "text") -> dict:
    """Top-1 / top-k accuracy, MRR (within the top k) and the ten worst misses. ``form``: the complaint as
    written ("text"), its findings as an EHR list string ("list") or as a structured record with no free
    text ("structured"); see knowledge/symptom_sets.py. Rows without findings are left out of list forms."""
    label_map = load_label_map(Path(label_map_path) if label_map_path else None)
    cases = load_cases(Path(jsonl_path)) if isinstance(jsonl_path, (str, Path)) else list(jsonl_path)
    cases = split_half(cases, split)
    if form != "text":
        cases = [c for c in (as_form(row, form) for row in cases) if c is not None]
    top1 = topk = 0
    rr = 0.0
    misses = []
    latencies = []
    confident_right = confident_n = 0
    for case in cases:
        res = retriever.search(case["query"], k=k, **({"patient": case["patient"]} if "patient" in case else {}))
        latencies.append(res.latency_ms)
        # A probe may name other library names for the same condition ("also_correct": 肩关节周围炎 for 肩周炎).
        labels = [case["label_disease"], *case.get("also_correct", [])]
        rank = next((i + 1 for i, h in enumerate(res.hits)
                     if any(is_correct(h.disease, label, label_map) for label in labels)), None)
        if res.confident:
            confident_n += 1
            confident_right += rank == 1
        if rank == 1:
            top1 += 1
        if rank:
            topk += 1
            rr += 1 / rank
        else:
            best = res.hits[0].score if res.hits else 0.0
            misses.append({"query": case["query"], "label": case["label_disease"], "top_score": best,
                           "got": [h.disease.name for h in res.hits]})
    n = max(len(cases), 1)
    misses.sort(key=lambda m: -m["top_score"])  # worst = most confidently wrong
    latencies.sort()
    return {"n": len(cases), "top1": top1 / n, f"top{k}": topk / n, "top5": topk / n if k == 5 else None,
            "mrr": rr / n, "confident_share": confident_n / n, "confident_n": confident_n,
            "confident_right": confident_right,
            "confident_precision": confident_right / confident_n if confident_n else None,
            "p50_ms": latencies[len(latencies) // 2] if latencies else None,
            "worst_misses": misses[:10]}
