"""A re-ranker of the search's shortlist, learned from real patients' questions (issue 16).

For a patient not identified as a child, the hand-weighted search's best `DEPTH` documents are re-scored
by a linear model over what the search already computed for each of them: the hand score itself, its
parts (fielded BM25, coverage, priors, explains-one-only, a named disease, the patients' words), plain
BM25 and the three rankings' ranks. It is a conditional logit (softmax over the shortlist), trained by
Newton's method on the dialogue questions of the 80% split (knowledge/dialogue_view.py) whose weak label
is in their shortlist, with the hand score as a fixed offset and an L2 penalty on everything learned, so
with no evidence it keeps the hand ranking. Each training question's patients' words come from a view
built without its own fold (5 folds by hash), as a new patient's would; the penalty is chosen by
cross-validation over the same folds. Deterministic: same data, same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from knowledge.text import normalise

if TYPE_CHECKING:
    from knowledge.dialogue_view import Labelled
    from knowledge.index import LibraryIndex
    from knowledge.search import Retriever, Scored

RANKER_VERSION = 1  # bump when the features, the training or the stored layout changes
DEPTH = 50  # shortlist re-ranked
FOLDS = 5  # cross-fitting of the patients' words and cross-validation of the penalty
PENALTIES = (0.001, 0.003, 0.01, 0.03, 0.1)  # L2 per training question, on standardised features
FUSION_K = 60.0
FEATURES = ("hand", "bm25", "coverage", "prior", "single", "named", "words", "plain",
            "log_rank", "log_rank_plain", "log_rank_words", "fused")


def _greater(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rank (documents scoring strictly more) of each row; the library's size for a row scoring 0."""
    n = len(values)
    srt = np.sort(values)
    ranks = n - np.searchsorted(srt, values[rows], side="right")
    return np.where(values[rows] > 0, ranks, n)


def features(scored: Scored, rows: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """Feature matrix (len(rows) x len(FEATURES)) of the shortlisted rows, best hand score first."""
    n = len(rows)
    zeros = np.zeros(n)
    hand_rank = np.arange(n, dtype=float)
    plain_rank = _greater(plain, rows)
    words = scored.words_part
    words_rank = _greater(words, rows) if words is not None else np.full(n, len(plain))
    top_plain = plain.max()
    named = np.array([scored.named.get(int(r), 0.0) for r in rows]) if scored.named else zeros
    fused = FUSION_K * (1 / (FUSION_K + 1 + hand_rank) + 1 / (FUSION_K + 1 + plain_rank)
                        + 1 / (FUSION_K + 1 + words_rank))
    return np.column_stack([
        scored.final[rows], scored.bm25[rows], scored.coverage[rows], scored.prior[rows],
        scored.single[rows] if scored.single is not None else zeros, named,
        words[rows] if words is not None else zeros,
        plain[rows] / top_plain if top_plain > 0 else zeros,
        np.log1p(hand_rank), np.log1p(plain_rank), np.log1p(words_rank), fused])


@dataclass(frozen=True)
class Ranker:
    """Weights on the raw features (the hand score's includes its fixed 1)."""

    weights: np.ndarray
    depth: int = DEPTH
    penalty: float = 0.0  # the chosen L2 (for the record)

    def scores(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weights

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": RANKER_VERSION, "features": FEATURES, "depth": self.depth,
                                   "penalty": self.penalty, "weights": self.weights.tolist()}), encoding="utf-8")
        tmp.replace(path)  # atomic publish

    @classmethod
    def load(cls, path: Path) -> Ranker:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if raw.get("version") != RANKER_VERSION or tuple(raw.get("features", ())) != FEATURES:
            raise ValueError(f"{path}: another ranker version")
        return cls(np.asarray(raw["weights"], dtype=float), int(raw["depth"]), float(raw["penalty"]))

    @classmethod
    def load_or_build(cls, retriever: Retriever, folder: Path, cache_dir: Path, progress: bool = True,
                      rebuild: bool = False) -> Ranker:
        """The ranker for the retriever's index and dialogue view, cached beside them (keyed by the view's
        key, which covers the index and the dialogue files, and the ranker's version)."""
        assert retriever.view is not None
        path = Path(cache_dir) / f"ranker-{retriever.view.key}-v{RANKER_VERSION}.json"
        if not rebuild and path.is_file():
            try:
                return cls.load(path)
            except (OSError, ValueError, KeyError):
                pass  # a damaged or outdated file is rebuilt below
        start = time.perf_counter()
        ranker = train(retriever.index, folder, progress)
        ranker.save(path)
        if progress:
            print(f"ranker trained in {time.perf_counter() - start:.1f}s (L2 {ranker.penalty}) -> {path}")
        return ranker


def fold_of(question: str) -> int:
    """Stable fold of a training question (other bytes of the digest than the 80/20 split reads)."""
    digest = hashlib.sha256(normalise(question.strip()).encode("utf-8")).digest()
    return int.from_bytes(digest[8:16], "big") % FOLDS


def shortlist(r: Retriever, query: str, depth: int = DEPTH) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, features) of a complaint's shortlist as the search computes them; None for a child, a
    complaint sharing no word with the library, or without the patients' words."""
    from knowledge.search import _top

    weights, current, named, cues = r._read(query)
    if cues.child:
        return None
    scored = r._score(weights, named, cues, current, (), keep_parts=True)
    if scored is None or scored.words_part is None:
        return None
    rows = _top(scored.final, depth)
    rows = rows[np.isfinite(scored.final[rows])]
    if len(rows) < 2:
        return None
    return rows, features(scored, rows, r.plain_scores(r.plain_tokens(query)))


@dataclass
class Groups:
    """Training shortlists padded to one depth: features, which are real, the label's place, the fold."""

    x: np.ndarray  # (questions, depth, features)
    mask: np.ndarray  # (questions, depth)
    label: np.ndarray  # (questions,)
    fold: np.ndarray  # (questions,)
    item: np.ndarray  # (questions,): the question's place in the training set


def collect(index_retriever: Retriever, train_set: Sequence[Labelled], words: Sequence[dict[str, float]],
            progress: bool = True) -> Groups:
    """Cross-fitted shortlists: a question of fold f is searched with patients' words from the others."""
    from knowledge.dialogue_view import DialogueView, words_model
    from knowledge.index import _progress

    folds = np.array([fold_of(x.question) for x in train_set])
    xs: list[np.ndarray] = []
    labels: list[int] = []
    kept_folds: list[int] = []
    items: list[int] = []
    bar = _progress(len(train_set), "ranker shortlists", progress)
    r = index_retriever
    for f in range(FOLDS):
        others: dict[int, list[str]] = {}
        for x, w, g in zip(train_set, words, folds, strict=True):
            if g != f:
                others.setdefault(x.row, []).extend(w)
        model, doc_rows = words_model(others)
        r.view = DialogueView(np.zeros(0, dtype=np.int32), model, doc_rows, [])
        for i, (x, g) in enumerate(zip(train_set, folds, strict=True)):
            if g != f:
                continue
            bar.update()
            got = shortlist(r, x.question)
            if got is None:
                continue
            rows, feats = got
            where = np.flatnonzero(rows == x.row)
            if len(where):
                xs.append(feats)
                labels.append(int(where[0]))
                kept_folds.append(f)
                items.append(i)
    bar.close()
    r.view = None
    n, depth = len(xs), max((len(x) for x in xs), default=0)
    x = np.zeros((n, depth, len(FEATURES)))
    mask = np.zeros((n, depth), dtype=bool)
    for i, feats in enumerate(xs):
        x[i, :len(feats)] = feats
        mask[i, :len(feats)] = True
    return Groups(x, mask, np.array(labels, dtype=int), np.array(kept_folds, dtype=int),
                  np.array(items, dtype=int))


def fit(groups: Groups, penalty: float, keep: np.ndarray | None = None, iters: int = 30,
        weight: np.ndarray | None = None) -> np.ndarray:
    """Conditional logit by Newton's method: score = hand + standardised features @ delta, L2 of
    penalty x questions on delta; returns the raw-feature weights."""
    sel = np.ones(len(groups.label), dtype=bool) if keep is None else keep
    x, mask, y = groups.x[sel], groups.mask[sel], groups.label[sel]
    u = np.ones(len(y)) if weight is None else weight[sel] / weight[sel].mean()
    real = x[mask]
    mu, sd = real.mean(axis=0), real.std(axis=0)
    sd = np.where(sd > 1e-9, sd, 1.0)
    z = np.where(mask[..., None], (x - mu) / sd, 0.0)
    hand = np.where(mask, x[..., 0], -np.inf)
    q, nf = len(y), x.shape[2]
    lam = penalty * q * np.eye(nf)
    delta = np.zeros(nf)
    picked = z[np.arange(q), y]

    def objective(d: np.ndarray) -> tuple[float, np.ndarray]:
        s = hand + z @ d
        top = s.max(axis=1, keepdims=True)
        p = np.exp(s - top)
        total = p.sum(axis=1, keepdims=True)
        loglik = u @ (s[np.arange(q), y] - top[:, 0] - np.log(total[:, 0]))
        return float(loglik - 0.5 * d @ lam @ d), p / total

    value, p = objective(delta)
    for _ in range(iters):
        mean = np.einsum("qn,qnf->qf", p, z)
        grad = u @ (picked - mean) - lam @ delta
        hess = np.einsum("q,qn,qnf,qng->fg", u, p, z, z) - (mean * u[:, None]).T @ mean + lam
        step = np.linalg.solve(hess, grad)
        # Newton's step, halved until the penalised likelihood rises (the full step can overshoot
        # where a feature nearly separates the labels).
        for _ in range(30):
            new_value, new_p = objective(delta + step)
            if new_value >= value:
                break
            step /= 2
        delta += step
        value, p = new_value, new_p
        if np.abs(step).max() < 1e-9:
            break
    weights = delta / sd
    weights[0] += 1.0  # the hand score's fixed offset
    return weights


def accuracy(groups: Groups, weights: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    """Share of the kept questions whose label the weights put first / in the first five."""
    s = np.where(groups.mask[keep], groups.x[keep] @ weights, -np.inf)
    label_score = s[np.arange(keep.sum()), groups.label[keep]]
    ahead = (s > label_score[:, None]).sum(axis=1)
    return float((ahead == 0).mean()), float((ahead < 5).mean())


def choose(groups: Groups) -> float:
    """The L2 penalty with the best cross-validated top-1 + top-5 over the folds (first on ties)."""
    best, best_value = PENALTIES[0], -1.0
    for penalty in PENALTIES:
        total = 0.0
        for f in range(FOLDS):
            held = groups.fold == f
            if held.all() or not held.any():
                continue
            w = fit(groups, penalty, ~held)
            total += sum(accuracy(groups, w, held)) * held.sum()
        if total > best_value + 1e-12:
            best, best_value = penalty, total
    return best


def train(index: LibraryIndex, folder: Path, progress: bool = True) -> Ranker:
    """Train on the dialogue questions of the 80% split (knowledge/dialogue_view.py) of `folder`."""
    from knowledge.dialogue_view import labelled_questions, view_terms
    from knowledge.index import _progress
    from knowledge.search import Retriever

    base = Retriever(index)  # default settings, as the view
    train_set = [x for x in labelled_questions(base, folder, progress) if not x.held_out]
    bar = _progress(len(train_set), "ranker words", progress)
    words = []
    for x in train_set:
        words.append(view_terms(base, x.question))
        bar.update()
    bar.close()
    groups = collect(base, train_set, words, progress)
    if not len(groups.label):
        return Ranker(np.eye(len(FEATURES))[0], DEPTH, 0.0)  # nothing to learn: the hand score
    penalty = choose(groups)
    return Ranker(fit(groups, penalty), DEPTH, penalty)
