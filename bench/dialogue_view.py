"""Search time with and without the dialogue view (knowledge/dialogue_view.py), alternated per query.

This mixes the first 250 dxy_dev complaints, the tuned adult probe and 250 held-out dialogue questions, runs
every query through both retrievers (order swapped each round) and prints CPU-time percentiles of the thread,
plus the cached load time of the index alone and of index + view. Prints only; writes nothing.

    python bench/dialogue_view.py [--library ../shared/data/diseases.jsonl] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from knowledge.dialogue_view import lay_dev_cases  # noqa: E402
from knowledge.search import Retriever  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--library", default=str(ROOT.parent / "shared/data/diseases.jsonl"))
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache/knowledge"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    library, cache = Path(args.library), Path(args.cache_dir)
    Retriever.load_or_build(library, cache, progress=True)  # build both caches first, untimed
    start = time.perf_counter()
    plain = Retriever.load_or_build(library, cache, progress=False, dialogues=False)
    index_s = time.perf_counter() - start
    start = time.perf_counter()
    heard = Retriever.load_or_build(library, cache, progress=False)
    view_s = time.perf_counter() - start
    if heard.view is None:
        print(f"no dialogues folder beside {library}", file=sys.stderr)
        return 1
    dxy = library.parent / "eval/dxy_dev.jsonl"
    queries = [json.loads(x)["query"] for x in dxy.read_text(encoding="utf-8").splitlines() if x.strip()][:250]
    probe = ROOT / "knowledge/data/probes/adult_complaints.jsonl"
    queries += [json.loads(x)["query"] for x in probe.read_text(encoding="utf-8").splitlines() if x.strip()]
    queries += [c["query"] for c in lay_dev_cases(heard.view, heard.index.meta.names, heard.index.meta.aliases)][:250]
    for q in queries:  # warm-up: word caches, prior caches
        plain.search(q)
        heard.search(q)
    samples: dict[str, list[float]] = {"with the view": [], "without": []}
    for round_no in range(args.rounds):
        pair = [("with the view", heard), ("without", plain)]
        for q in queries:
            for name, r in pair if round_no % 2 == 0 else pair[::-1]:
                t = time.thread_time()
                r.search(q)
                samples[name].append((time.thread_time() - t) * 1000)
    print(f"cached load: index {index_s:.2f}s, index + dialogue view {view_s:.2f}s")
    for name, ms in samples.items():
        a = np.array(ms)
        print(f"{name:14s} {len(queries)} queries x {args.rounds}: CPU time p50 {np.percentile(a, 50):.2f} ms, "
              f"p99 {np.percentile(a, 99):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
