"""The rejected learned re-ranker (knowledge/ranker.py at this commit), measured: prints top-1 / top-5 on
the dialogue lay set, the tuned adult probe and dxy_dev halves a / b for the current search and for the
ranker at shortlist depths 50 / 10 / 5, trained on all 80%-split questions or only those that do not name
their disease, with the L2 penalty chosen by 5-fold cross-validation on the training questions.

    python bench/ranker_experiment.py [--library ../shared/data/diseases.jsonl]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from knowledge import ranker as R  # noqa: E402
from knowledge.dialogue_view import labelled_questions, lay_dev_cases, view_terms  # noqa: E402
from knowledge.evaluate import is_correct, load_cases, load_label_map, split_half  # noqa: E402
from knowledge.search import Retriever  # noqa: E402
from knowledge.text import normalise  # noqa: E402


def prepared(r: Retriever, cases: list[dict], label_map: dict[str, str]) -> list[tuple]:
    """Per case: the current search's rank of the label, and the shortlist's features + correct mask."""
    out = []
    for c in cases:
        labels = [c["label_disease"], *c.get("also_correct", [])]
        hits = r.search(c["query"]).hits
        rank = next((i for i, h in enumerate(hits) if any(is_correct(h.disease, x, label_map) for x in labels)), None)
        got = R.shortlist(r, c["query"])
        if got is None:
            out.append((rank, None, None))
            continue
        rows, feats = got
        correct = np.array([any(is_correct(r.index.doc(int(x)), lab, label_map) for lab in labels) for x in rows])
        out.append((rank, feats, correct))
    return out


def accuracy(items: list[tuple], w: np.ndarray | None, depth: int) -> str:
    t1 = t5 = 0
    for rank, feats, correct in items:
        if feats is None or w is None:
            t1 += rank == 0
            t5 += rank is not None
            continue
        head = np.argsort(-(feats[:depth] @ w), kind="stable")
        order = np.concatenate([head, np.arange(depth, len(feats))])[:5]
        t1 += bool(correct[order[0]])
        t5 += bool(correct[order].any())
    return f"{100 * t1 / len(items):.1f} / {100 * t5 / len(items):.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--library", default=str(ROOT.parent / "shared/data/diseases.jsonl"))
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache/knowledge"))
    args = parser.parse_args()
    library, cache = Path(args.library), Path(args.cache_dir)
    folder = library.parent / "dialogues"
    base = Retriever.load_or_build(library, cache, progress=False, dialogues=False)
    train = [x for x in labelled_questions(base, folder, False) if not x.held_out]
    groups = R.collect(base, train, [view_terms(base, x.question) for x in train], False)
    m = base.index.meta
    names_of = [[normalise(n) for n in (a, *b) if len(n) >= 2] for a, b in zip(m.names, m.aliases, strict=True)]
    naming = np.array([any(n in normalise(train[i].question) for n in names_of[train[i].row]) for i in groups.item])
    print(f"{len(train)} training questions, {len(groups.label)} with the label in the first {R.DEPTH}, "
          f"{int((~naming).sum())} of them not naming it")
    r = Retriever.load_or_build(library, cache, progress=False)
    assert r.view is not None
    dxy = load_cases(library.parent / "eval/dxy_dev.jsonl")
    label_map = load_label_map(library.parent / "eval/label_map.json")
    sets = {"dialogue lay": prepared(r, lay_dev_cases(r.view, m.names, m.aliases), {}),
            "adult (tuned)": prepared(r, load_cases(ROOT / "knowledge/data/probes/adult_complaints.jsonl"), {}),
            "dxy a": prepared(r, split_half(dxy, "a"), label_map),
            "dxy b": prepared(r, split_half(dxy, "b"), label_map)}
    print("current search: " + "; ".join(f"{k} {accuracy(v, None, 0)}" for k, v in sets.items()))
    for depth in (50, 10, 5):
        for tag, keep in (("all questions", groups.label < depth), ("not naming", (groups.label < depth) & ~naming)):
            g = R.Groups(groups.x[keep], groups.mask[keep].copy(), groups.label[keep], groups.fold[keep],
                         groups.item[keep])
            g.mask[:, depth:] = False
            penalty = R.choose(g)
            for pen in (penalty, 3.0):
                w = R.fit(g, pen)
                print(f"depth {depth}, {tag}, L2 {pen}{' (CV)' if pen == penalty else ''}: "
                      + "; ".join(f"{k} {accuracy(v, w, depth)}" for k, v in sets.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
