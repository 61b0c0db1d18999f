"""Per-row sampling: top-k / top-p draws follow the exact truncated distribution, on the candidate path
and on the threshold (bisection) path, and a row's draw does not depend on the other rows of its batch."""

from __future__ import annotations

import pytest
import torch

from service.engine.sampling import TOP_P_CANDIDATES, RowSampling, sample

CPU = torch.device("cpu")


def exact(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    scaled = logits / temperature
    if top_k:
        scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], float("-inf"))
    probs = scaled.softmax(-1)
    ordered, ids = probs.sort(descending=True)
    keep = (ordered.cumsum(0) - ordered) < top_p
    out = torch.zeros_like(probs)
    out[ids[keep]] = ordered[keep]
    return out / out.sum()


@pytest.mark.parametrize("spread, top_p, top_k", [(6.0, 0.8, 0), (0.3, 0.9, 0), (1.0, 1.0, 7), (1.0, 0.6, 12)])
def test_draws_follow_the_truncated_distribution(spread: float, top_p: float, top_k: int) -> None:
    # spread 6: the nucleus lies within the candidates; spread 0.3 over a big vocabulary: it does not (bisection).
    vocab = 4 * TOP_P_CANDIDATES
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * spread
    rows = RowSampling([0.9], [top_p], [top_k], [1.0], CPU)
    draws = 8000
    uniforms = torch.rand(draws, generator=torch.Generator().manual_seed(1))
    counts = torch.zeros(vocab)
    batch = 500
    for start in range(0, draws, batch):
        many = RowSampling([0.9] * batch, [top_p] * batch, [top_k] * batch, [1.0] * batch, CPU)
        picks = sample(logits.expand(batch, -1), many, None, uniforms[start:start + batch])
        counts += torch.bincount(picks, minlength=vocab)
    expected = exact(logits, 0.9, top_p, top_k)
    assert bool((counts[expected == 0] == 0).all())  # nothing outside the nucleus / top-k
    assert (counts / draws - expected).abs().max() < 0.03
    assert rows.any_top_p == (top_p < 1.0)


def test_a_rows_draw_does_not_depend_on_its_batch() -> None:
    gen = torch.Generator().manual_seed(2)
    peaked = torch.randn(1, 1024, generator=gen) * 8
    flat = torch.randn(1, 1024, generator=gen) * 0.1  # its candidates miss top_p: the threshold path
    u = torch.tensor([0.37])
    alone = sample(peaked, RowSampling([0.7], [0.9], [0], [1.0], CPU), None, u)
    both = sample(torch.cat([peaked, flat]), RowSampling([0.7, 0.7], [0.9, 0.95], [0, 0], [1.0, 1.0], CPU), None,
                  torch.tensor([0.37, 0.81]))
    assert int(both[0]) == int(alone[0])
