"""Per-row sampling: top-k / top-p draws follow the exact truncated distribution (nucleus by rejection, ties
at the threshold included, the bisection fallback for rows that reject every proposal), and a row's draw
does not depend on the other rows of its batch."""

from __future__ import annotations

import pytest
import torch

from service.engine.sampling import REJECTION_ROUNDS, UNIFORMS, RowSampling, sample

CPU = torch.device("cpu")


def exact(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, penalty: float = 1.0,
          seen: torch.Tensor | None = None) -> torch.Tensor:
    """The truncated distribution: a token is in the nucleus iff the tokens strictly more likely than it
    hold less than top_p (the smallest sorted prefix reaching top_p, with every tie at its threshold)."""
    if seen is not None:
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    scaled = logits / temperature
    if top_k:
        scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], float("-inf"))
    probs = scaled.softmax(-1).double()
    above = torch.stack([probs[probs > p].sum() for p in probs])
    out = torch.where((above < top_p) & (probs > 0), probs, 0.0)
    return (out / out.sum()).float()


def draw_counts(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, draws: int,
                penalty: float = 1.0, seen: torch.Tensor | None = None) -> torch.Tensor:
    uniforms = torch.rand(draws, UNIFORMS, generator=torch.Generator().manual_seed(1))
    counts = torch.zeros(logits.shape[-1])
    batch = 500
    for start in range(0, draws, batch):
        many = RowSampling([temperature] * batch, [top_p] * batch, [top_k] * batch, [penalty] * batch, CPU)
        batch_seen = None if seen is None else seen.expand(batch, -1)
        picks = sample(logits.expand(batch, -1), many, batch_seen, uniforms[start:start + batch])
        counts += torch.bincount(picks, minlength=logits.shape[-1])
    return counts


@pytest.mark.parametrize("spread, top_p, top_k", [(6.0, 0.8, 0), (0.3, 0.9, 0), (1.0, 1.0, 7), (1.0, 0.6, 12)])
def test_draws_follow_the_truncated_distribution(spread: float, top_p: float, top_k: int) -> None:
    # spread 6: a peaked distribution (few tokens in the nucleus); spread 0.3 over 256 tokens: a flat one.
    vocab = 256
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * spread
    draws = 8000
    counts = draw_counts(logits, 0.9, top_p, top_k, draws)
    expected = exact(logits, 0.9, top_p, top_k)
    assert bool((counts[expected == 0] == 0).all())  # nothing outside the nucleus / top-k
    assert (counts / draws - expected).abs().max() < 0.03
    assert RowSampling([0.9], [top_p], [top_k], [1.0], CPU).any_top_p == (top_p < 1.0)


@pytest.mark.parametrize("top_p", [0.9, 0.5, 0.2, 0.05])
def test_flat_rows_follow_the_nucleus_for_any_top_p(top_p: float) -> None:
    # Acceptance per round = the nucleus mass, so 0.2 and 0.05 need several rounds and often all of them
    # (0.95 ** 8: two draws in three take the bisection fallback); a biased fallback would show here.
    logits = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 0.3
    seen = torch.zeros(64, dtype=torch.bool)
    seen[::5] = True
    draws = 20000
    counts = draw_counts(logits, 0.7, top_p, 0, draws, penalty=1.3, seen=seen)
    expected = exact(logits, 0.7, top_p, 0, penalty=1.3, seen=seen)
    assert bool((counts[expected == 0] == 0).all())
    assert (counts / draws - expected).abs().max() < 0.02  # about 6 standard deviations at worst
    assert int((expected > 0).sum()) < 64  # top_p truncates something


def test_ties_at_the_threshold_are_all_kept() -> None:
    # 0.3 and the first 0.2 already reach 0.4 in sorted order; the other two 0.2s tie with it and stay too.
    probs = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2])
    logits = probs.log()
    draws = 10000
    counts = draw_counts(logits, 1.0, 0.4, 0, draws)
    assert int(counts[0]) == 0
    assert (counts / draws - torch.tensor([0.0, 2 / 9, 3 / 9, 2 / 9, 2 / 9])).abs().max() < 0.02


def test_a_row_that_rejects_every_proposal_draws_from_the_nucleus_with_its_last_uniform() -> None:
    # top_p 0.5 keeps tokens 0 and 1 (0.3 each); a proposal at 0.9 lands on token 3, outside.
    logits = torch.tensor([[0.3, 0.3, 0.2, 0.2]]).log()
    rows = RowSampling([1.0], [0.5], [0], [1.0], CPU)
    uniforms = torch.full((1, UNIFORMS), 0.9)
    uniforms[0, -1] = 0.8  # the fallback's uniform, over the nucleus only: token 1
    assert int(sample(logits, rows, None, uniforms)[0]) == 1
    uniforms[0, -1] = 0.2
    assert int(sample(logits, rows, None, uniforms)[0]) == 0
    uniforms[0, REJECTION_ROUNDS - 1] = 0.55  # the last proposal (token 1) is accepted before the fallback
    assert int(sample(logits, rows, None, uniforms)[0]) == 1
    uniforms[0, 0] = 0.1  # so is the first one (token 0), whatever comes after
    assert int(sample(logits, rows, None, uniforms)[0]) == 0


def test_a_rows_draw_does_not_depend_on_its_batch() -> None:
    gen = torch.Generator().manual_seed(2)
    peaked = torch.randn(1, 1024, generator=gen) * 8
    flat = torch.randn(1, 1024, generator=gen) * 0.1
    u = torch.rand(1, UNIFORMS, generator=gen)
    alone = sample(peaked, RowSampling([0.7], [0.9], [0], [1.0], CPU), None, u)
    both = sample(torch.cat([peaked, flat]), RowSampling([0.7, 0.7], [0.9, 0.95], [0, 0], [1.0, 1.0], CPU), None,
                  torch.cat([u, torch.rand(1, UNIFORMS, generator=gen)]))
    assert int(both[0]) == int(alone[0])


def test_flat_rows_draw_the_same_alone_and_in_any_batch() -> None:
    # Rows of a batch accept in different rounds (top_p 0.2 rows often fall back); each row's draw must not move.
    gen = torch.Generator().manual_seed(4)
    logits = torch.cat([torch.randn(3, 1024, generator=gen) * 0.1, torch.randn(1, 1024, generator=gen) * 8])
    top_p, temperature = [0.2, 0.9, 0.5, 0.9], [0.7, 1.2, 0.7, 0.0]
    batch = RowSampling(temperature, top_p, [0] * 4, [1.0] * 4, CPU)
    for _ in range(200):
        uniforms = torch.rand(4, UNIFORMS, generator=gen)
        together = sample(logits, batch, None, uniforms)
        for i in range(3):
            alone = sample(logits[i:i + 1], RowSampling([temperature[i]], [top_p[i]], [0], [1.0], CPU), None,
                           uniforms[i:i + 1])
            assert int(alone[0]) == int(together[i])
        assert int(together[3]) == int(logits[3].argmax())  # the greedy row


def test_rows_without_top_p_draw_their_first_uniform_in_vocabulary_order() -> None:
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]).log()
    uniforms = torch.full((2, UNIFORMS), 0.05)
    uniforms[:, 0] = torch.tensor([0.25, 0.65])
    rows = RowSampling([1.0, 1.0], [1.0, 0.3], [0, 0], [1.0, 1.0], CPU)
    # Row 0: cumulative 0.1, 0.3, 0.6, 1.0 puts 0.25 on token 1. Row 1 (top_p 0.3): only token 0 is kept.
    assert sample(logits, rows, None, uniforms).tolist() == [1, 0]


@pytest.mark.parametrize("top_p, top_k", [(1.0, 0), (1.0, 2), (0.9, 0)])
def test_a_zero_uniform_never_draws_a_token_of_probability_zero(top_p: float, top_k: int) -> None:
    # Token 0 is removed (-inf, as min_new_tokens does to EOS) or falls outside top-k; a uniform of exactly 0
    # must still land on a token the row may emit.
    logits = torch.tensor([[float("-inf") if top_k == 0 else -5.0, 1.0, 2.0, 0.5]])
    rows = RowSampling([1.0], [top_p], [top_k], [1.0], CPU)
    assert int(sample(logits, rows, None, torch.zeros((1, UNIFORMS)))[0]) != 0
