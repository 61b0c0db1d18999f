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


# Top-p looks at the most likely tokens first. A row whose candidates do not reach its top_p (a flat
# distribution) finds its nucleus by bisection on the probability threshold instead of sorting the whole
# vocabulary (a sort of 8 x 8192 took 4-13 ms on one shared CPU core, as long as the tiny model's forward).
TOP_P_CANDIDATES = 64
THRESHOLD_STEPS = 24  # bisection steps: the threshold to within max_p / 2**24


def sample(logits: torch.Tensor, rows: RowSampling, seen: torch.Tensor | None,
           uniforms: torch.Tensor | None) -> torch.Tensor:
    """Pick one token per row. uniforms: one U(0,1) per row from the row's own generator."""
    logits = logits.float()
    if rows.any_penalty and seen is not None:
        logits = apply_repetition_penalty(logits, seen, rows.penalty)
    greedy_ids = logits.argmax(dim=-1)
    if rows.all_greedy or uniforms is None:
        return greedy_ids
    vocab = logits.shape[-1]
    scaled = logits / rows.temperature
    if rows.any_top_k:
        # Keep scores at or above each row's k-th best (ties at the k-th are kept); top_k 0 keeps all.
        best = scaled.topk(min(int(rows.top_k.max()), vocab), dim=-1).values
        kth = best.gather(-1, (rows.top_k.clamp(min=1, max=best.shape[-1]) - 1))
        scaled = scaled.masked_fill((rows.top_k > 0) & (scaled < kth), float("-inf"))
    probs = scaled.softmax(dim=-1)
    targets = uniforms[:, None]
    # Rows without top-p draw from the whole distribution in vocabulary order: no sort at all.
    cumulative = probs.cumsum(dim=-1)
    picks = torch.searchsorted(cumulative, targets * cumulative[:, -1:]).clamp_(max=vocab - 1)
    sampled = picks.squeeze(-1)
    if rows.any_top_p:
        top, ids = probs.topk(min(TOP_P_CANDIDATES, vocab), dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the first token).
        kept = top.masked_fill((top.cumsum(dim=-1) - top) >= rows.top_p, 0.0)
        kept_cumulative = kept.cumsum(dim=-1)
        nucleus = torch.searchsorted(kept_cumulative, targets * kept_cumulative[:, -1:]).clamp_(max=top.shape[-1] - 1)
        nucleus_ids = ids.gather(-1, nucleus).squeeze(-1)
        # Each row decides for itself (so its draw never depends on the other rows of the batch).
        flat = ((rows.top_p < 1.0) & (top.sum(dim=-1, keepdim=True) < rows.top_p)).squeeze(-1)
        if bool(flat.any()):
            nucleus_ids = torch.where(flat, _threshold_nucleus(probs, rows.top_p, targets), nucleus_ids)
        sampled = torch.where(rows.top_p.squeeze(-1) < 1.0, nucleus_ids, sampled)
    return torch.where(rows.greedy, greedy_ids, sampled)


def _threshold_nucleus(probs: torch.Tensor, top_p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Draw from the tokens whose probability is at least the nucleus threshold: the largest t with
    mass(p >= t) >= top_p, found by bisection (the same set the sorted prefix keeps, ties included)."""
    low = torch.zeros_like(top_p)
    high = probs.max(dim=-1, keepdim=True).values
    for _ in range(THRESHOLD_STEPS):
        middle = (low + high) / 2
        enough = (probs * (probs >= middle)).sum(dim=-1, keepdim=True) >= top_p
        low = torch.where(enough, middle, low)
        high = torch.where(enough, high, middle)
    kept = probs * (probs >= low)
    cumulative = kept.cumsum(dim=-1)
    return torch.searchsorted(cumulative, targets * cumulative[:, -1:]).clamp_(max=probs.shape[-1] - 1).squeeze(-1)
