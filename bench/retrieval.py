"""Retrieval latency: this project vs rank-bm25 BM25Okapi, from one run; writes bench/results/retrieval.json
and a chart, bench/results/retrieval.png.

Also checks that the plain-BM25 fast path (bm25s, method="robertson") returns the same top-k as
rank-bm25 BM25Okapi(k1, b, epsilon=0) over the same tokens.

    python bench/retrieval.py [--library ../shared/data/diseases.jsonl] [--queries N]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from rank_bm25 import BM25Okapi

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from knowledge.search import Retriever, _top  # noqa: E402
from knowledge.symptom_sets import as_form  # noqa: E402


def percentiles(ms: list[float]) -> dict[str, float]:
    arr = np.array(ms)
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "mean_ms": float(arr.mean())}


def same_topk(a: np.ndarray, b: np.ndarray, scores: np.ndarray, k: int) -> bool:
    """Equal top-k ids, allowing swaps between documents whose scores tie."""
    if list(a[:k]) == list(b[:k]):
        return True
    sa, sb = np.sort(scores[a[:k]]), np.sort(scores[b[:k]])
    return bool(np.allclose(sa, sb, rtol=1e-6, atol=1e-9))


def plot(rows: dict[str, dict[str, float]], path: Path) -> None:
    """p50 / p99 per method on a log scale, with the speed-up over rank-bm25 on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    labels = ["full search", "plain BM25\n(bm25s)", "rank-bm25", "full search,\ncold caches", "full search,\nCPU time",
              "full search,\nEHR lists"]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for offset, key, color in ((-0.2, "p50", "#4a7"), (0.2, "p99", "#e83")):
        values = [rows[n][f"{key}_ms"] for n in names]
        bars = ax.bar(x + offset, values, 0.4, label=key, color=color)
        ax.bar_label(bars, labels=[f"{v:.2f} ms\n{rows[n][f'{key}_speedup_vs_rank_bm25']:.0f}x"
                                   for n, v in zip(names, values, strict=True)], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(top=max(r["p99_ms"] for r in rows.values()) * 8)  # room for the labels
    ax.set_xticks(x, labels[: len(names)])
    ax.set_ylabel("ms per query (log)")
    ax.set_title("Retrieval latency, 8,791 diseases, same run (ratio = vs rank-bm25)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _timed(fn, q):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn(q)
    return out, (time.perf_counter() - t) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--library", default=str(ROOT.parent / "shared/data/diseases.jsonl"))
    parser.add_argument("--queries-file", default=str(ROOT.parent / "shared/data/eval/dxy_dev.jsonl"))
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache/knowledge"))
    parser.add_argument("--queries", type=int, default=250, help="queries timed (rank-bm25 ~0.15 s each)")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the queries per method")
    parser.add_argument("--out", default=str(ROOT / "bench/results/retrieval.json"))
    args = parser.parse_args()

    start = time.perf_counter()
    retriever = Retriever.load_or_build(Path(args.library), Path(args.cache_dir), progress=True)
    load_s = time.perf_counter() - start
    lines = Path(args.queries_file).read_text(encoding="utf-8").splitlines()
    rows_in = [json.loads(x) for x in lines if x.strip()][: args.queries]
    queries = [r["query"] for r in rows_in]
    # The same complaints' findings as an EHR writes them (knowledge/symptom_sets.py), where the file has them.
    list_queries = [c["query"] for c in (as_form(r, "list") for r in rows_in) if c is not None]
    settings = retriever.index.settings
    corpus = retriever.index.corpus_tokens()
    t0 = time.perf_counter()
    okapi = BM25Okapi(corpus, k1=settings.k1, b=settings.b, epsilon=0)
    okapi_build_s = time.perf_counter() - t0

    def ours(q: str) -> None:
        retriever.search(q, k=args.k)

    def fast(q: str) -> np.ndarray:
        return _top(retriever.plain_scores(retriever.plain_tokens(q)), args.k)

    def reference(q: str) -> np.ndarray:
        return okapi.get_scores(retriever.plain_tokens(q))

    for q in queries[:20]:  # warm-up of every method
        ours(q), fast(q), reference(q)
    # Each method runs over all queries in its own pass (standard practice: the CPU caches hold that
    # method's data, as in a service that is only searching), passes alternated over rounds so drift on
    # a noisy machine hits every method. A fourth row times the full search right after each rank-bm25
    # query, whose ~50 MB of per-document dicts evict the CPU caches: the pessimistic, cold-cache case.
    samples: dict[str, list[float]] = {"ours": [], "plain": [], "ref": [], "cold": [], "lists": [], "ours_cpu": []}
    matches = 0
    for round_no in range(args.rounds):
        order = ["ours", "plain", "ref"] if round_no % 2 == 0 else ["ref", "plain", "ours"]
        for q in list_queries:
            samples["lists"].append(_timed(ours, q)[1])
        for method in order:
            for q in queries:
                if method == "ours":
                    cpu = time.thread_time()
                    samples["ours"].append(_timed(ours, q)[1])
                    samples["ours_cpu"].append((time.thread_time() - cpu) * 1000)
                elif method == "plain":
                    samples["plain"].append(_timed(fast, q)[1])
                else:
                    ref_scores, ms = _timed(reference, q)
                    samples["ref"].append(ms)
                    samples["cold"].append(_timed(ours, q)[1])
                    if round_no == 0:
                        slow = np.argsort(-ref_scores, kind="stable")[: args.k]
                        matches += same_topk(fast(q), slow, ref_scores, args.k)

    rows = {"this project (fielded + priors, full search)": percentiles(samples["ours"]),
            "this project plain BM25 fast path (bm25s)": percentiles(samples["plain"]),
            "rank-bm25 BM25Okapi (epsilon=0)": percentiles(samples["ref"]),
            "full search, right after each rank-bm25 query (cold caches)": percentiles(samples["cold"])}
    # CPU time of the same full searches: on a shared machine wall-clock p99 is mostly time spent descheduled.
    rows["this project, full search: CPU time of the thread"] = percentiles(samples["ours_cpu"])
    if samples["lists"]:
        rows["full search, the same complaints as EHR symptom lists"] = percentiles(samples["lists"])
    ref_p = rows["rank-bm25 BM25Okapi (epsilon=0)"]
    print(f"library: {retriever.size} diseases, {len(queries)} queries x {args.rounds} rounds, k={args.k}, "
          f"index load {load_s:.2f}s, rank-bm25 build {okapi_build_s:.1f}s")
    print(f"{'method':60s} {'p50 ms':>8s} {'p99 ms':>8s} {'p50 ratio':>10s} {'p99 ratio':>10s}")
    for name, p in rows.items():
        p["p50_speedup_vs_rank_bm25"] = ref_p["p50_ms"] / p["p50_ms"]
        p["p99_speedup_vs_rank_bm25"] = ref_p["p99_ms"] / p["p99_ms"]
        print(f"{name:60s} {p['p50_ms']:8.2f} {p['p99_ms']:8.2f} "
              f"{p['p50_speedup_vs_rank_bm25']:9.0f}x {p['p99_speedup_vs_rank_bm25']:9.0f}x")
    print(f"plain fast path top-{args.k} == rank-bm25 top-{args.k}: {matches}/{len(queries)} queries")
    result = {"library": str(args.library), "documents": retriever.size, "queries": len(queries),
              "rounds": args.rounds, "k": args.k,
              "index_load_s": load_s, "rank_bm25_build_s": okapi_build_s, "rows": rows,
              "topk_match": {"matched": matches, "total": len(queries)},
              "machine": {"python": platform.python_version(), "platform": platform.platform()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    chart = Path(args.out).with_suffix(".png")
    plot(rows, chart)
    print(f"written to {args.out} and {chart}")
    return 0 if matches == len(queries) else 1


if __name__ == "__main__":
    sys.exit(main())
