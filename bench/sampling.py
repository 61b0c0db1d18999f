"""Sampling benchmark (issue 14): per-call ms of `service.engine.sampling.sample` against the code it
replaced (64 candidates, then a 24-step threshold bisection for rows whose candidates miss top_p; the
penalty as a masked where over [rows, vocab]), in the same run, interleaved.

    python bench/sampling.py [--top-p 0.9] [--penalty 1.1] [--repeats 7] [--calls 100]

Rows 1 and 8, vocabulary 8192, temperature 0.7, repetition penalty 1.1 on 32 seen tokens (the /chat
defaults; --penalty 1.0 leaves it out), one torch thread. Flat rows are random logits x 0.1 (a model with
random weights: the nucleus needs ~6000 tokens); peaked rows random logits x 8 (a trained model's). Each
call gets fresh uniforms, so the new code's rejection rounds vary as they do when serving. Prints the
median over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engine.sampling import (  # noqa: E402
    UNIFORMS,
    RowSampling,
    _threshold_nucleus,
    apply_top_k,
    sample,
)

VOCAB = 8192
# The replaced code (commit 8e112d0's sampling.py), kept here only as the baseline measured in the same run.
OLD_CANDIDATES = 64


def old_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def old_sample(logits: torch.Tensor, rows: RowSampling, seen: torch.Tensor | None,
               uniforms: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float()
    if rows.any_penalty and seen is not None:
        logits = old_repetition_penalty(logits, seen, rows.penalty)
    greedy_ids = logits.argmax(dim=-1)
    if rows.all_greedy or uniforms is None:
        return greedy_ids
    vocab = logits.shape[-1]
    scaled = logits / rows.temperature
    if rows.any_top_k:  # top-k is unchanged
        scaled = apply_top_k(scaled, rows.top_k)
    probs = scaled.softmax(dim=-1)
    targets = uniforms[:, None]
    cumulative = probs.cumsum(dim=-1)
    picks = torch.searchsorted(cumulative, targets * cumulative[:, -1:]).clamp_(max=vocab - 1)
    sampled = picks.squeeze(-1)
    if rows.any_top_p:
        top, ids = probs.topk(min(OLD_CANDIDATES, vocab), dim=-1)
        kept = top.masked_fill((top.cumsum(dim=-1) - top) >= rows.top_p, 0.0)
        kept_cumulative = kept.cumsum(dim=-1)
        nucleus = torch.searchsorted(kept_cumulative, targets * kept_cumulative[:, -1:]).clamp_(max=top.shape[-1] - 1)
        nucleus_ids = ids.gather(-1, nucleus).squeeze(-1)
        flat = ((rows.top_p < 1.0) & (top.sum(dim=-1, keepdim=True) < rows.top_p)).squeeze(-1)
        if bool(flat.any()):
            # The bisection is unchanged: the new sampler keeps it as its fallback.
            nucleus_ids = torch.where(flat, _threshold_nucleus(probs, rows.top_p, targets), nucleus_ids)
        sampled = torch.where(rows.top_p.squeeze(-1) < 1.0, nucleus_ids, sampled)
    return torch.where(rows.greedy, greedy_ids, sampled)


Sampler = Callable[[torch.Tensor, RowSampling, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def per_call_ms(fn: Sampler, logits: torch.Tensor, rows: RowSampling, seen: torch.Tensor,
                uniforms: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for u in uniforms:
        fn(logits, rows, seen, u)
    return (time.perf_counter() - start) / len(uniforms) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--penalty", type=float, default=1.1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    cases = []
    for n in (1, 8):
        rows = RowSampling([0.7] * n, [args.top_p] * n, [0] * n, [args.penalty] * n, torch.device("cpu"))
        seen = torch.zeros(n, VOCAB, dtype=torch.bool)
        seen[:, torch.randperm(VOCAB, generator=gen)[:32]] = True
        uniforms = [torch.rand(n, UNIFORMS, generator=gen) for _ in range(args.calls)]
        for kind, scale in (("flat", 0.1), ("peaked", 8.0)):
            logits = torch.randn(n, VOCAB, generator=gen) * scale
            old_sample(logits, rows, seen, uniforms[0][:, 0])
            sample(logits, rows, seen, uniforms[0])  # warm-up
            cases.append((n, kind, logits, rows, seen, uniforms, [], []))
    for _ in range(args.repeats):  # interleaved: every case, old then new, in each repeat
        for _, _, logits, rows, seen, uniforms, old_ms, new_ms in cases:
            old_ms.append(per_call_ms(old_sample, logits, rows, seen, [u[:, 0] for u in uniforms]))
            new_ms.append(per_call_ms(sample, logits, rows, seen, uniforms))
    print(f"top_p {args.top_p}, penalty {args.penalty}, vocab {VOCAB}, 1 torch thread, "
          f"median of {args.repeats} x {args.calls} calls")
    print(f"{'rows':>4} {'logits':>7} {'old ms':>8} {'new ms':>8} {'old/new':>8}")
    for n, kind, _, _, _, _, old_ms, new_ms in cases:
        old_m, new_m = statistics.median(old_ms), statistics.median(new_ms)
        print(f"{n:>4} {kind:>7} {old_m:>8.3f} {new_m:>8.3f} {old_m / new_m:>7.1f}x")


if __name__ == "__main__":
    main()
