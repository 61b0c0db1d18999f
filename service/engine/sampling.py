"""Vectorised per-row sampling: each row of a batch keeps its own temperature, top-p, top-k,
repetition penalty and seed."""

from __future__ import annotations

import torch


class RowSampling:
    """Per-row sampling parameters stacked for the current batch."""

    def __init__(self, temperature: list[float], top_p: list[float], top_k: list[int],
                 repetition_penalty: list[float], device: torch.device) -> None:
        self.greedy = torch.tensor([t <= 0 for t in temperature], device=device)
        self.all_greedy = bool(self.greedy.all())
        self.temperature = torch.tensor([max(t, 1e-5) for t in temperature], device=device)[:, None]
        self.top_p = torch.tensor(top_p, device=device)[:, None]
        self.top_k = torch.tensor(top_k, device=device)[:, None]
        self.penalty = torch.tensor(repetition_penalty, device=device)[:, None]
        self.any_penalty = any(p != 1.0 for p in repetition_penalty)
        self.any_top_k = any(k > 0 for k in top_k)
        self.any_top_p = any(p < 1.0 for p in top_p)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty on tokens this row has generated (seen: bool [B, V])."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample(logits: torch.Tensor, rows: RowSampling, seen: torch.Tensor | None,
           uniforms: torch.Tensor | None) -> torch.Tensor:
    """Pick one token per row. uniforms: one U(0,1) per row from the row's own generator."""
    logits = logits.float()
    if rows.any_penalty and seen is not None:
        logits = apply_repetition_penalty(logits, seen, rows.penalty)
    greedy_ids = logits.argmax(dim=-1)
    if rows.all_greedy or uniforms is None:
        return greedy_ids
    scaled = logits / rows.temperature
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
    if rows.any_top_k:
        ranks = torch.arange(sorted_logits.shape[-1], device=logits.device)[None, :]
        keep_k = (rows.top_k <= 0) | (ranks < rows.top_k)
        sorted_logits = sorted_logits.masked_fill(~keep_k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    if rows.any_top_p:
        cumulative = probs.cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the first token).
        drop = (cumulative - probs) >= rows.top_p
        probs = probs.masked_fill(drop, 0.0)
    cumulative = probs.cumsum(dim=-1)
    targets = uniforms[:, None] * cumulative[:, -1:]
    picks = torch.searchsorted(cumulative, targets).clamp_(max=probs.shape[-1] - 1)
    sampled = sorted_ids.gather(-1, picks).squeeze(-1)
    return torch.where(rows.greedy, greedy_ids, sampled)
