"""ChatGLM-6B's position ids: where each token sits, computed from the ids alone.

The original (`get_position_ids`) numbers the context 0, 1, 2, ... up to the token before <sop> (bos);
from <sop> on every token takes the position of the mask token ([gMASK] if the context has one, else
[MASK]) and a block position 1, 2, 3, ... counts the generated block (the context's block position is 0).
With `position_encoding_2d` false there is one position: the context's numbering continues through the
block after a [gMASK], and stays at the mask position after a [MASK].

Padding (attention_mask 0) is skipped: a row's positions count from its first real token, so a prompt
has the same positions alone and inside a left-padded batch. A row without <sop> is numbered 0, 1, 2, ...
and attends causally (the original refuses such rows; the engine's probe and plain text need them).

`ChatGLM6BPositions` is the engine's per-row scheme (llm.positions.PositionScheme); it derives its state
from the same function, so the engine's step-wise positions cannot drift from a full forward's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SpecialIds:
    bos: int  # <sop>
    gmask: int  # [gMASK]
    mask: int  # [MASK]
    two_d: bool  # position_encoding_2d

    @classmethod
    def of(cls, config: Any) -> SpecialIds:
        return cls(int(config.bos_token_id), int(config.gmask_token_id), int(config.mask_token_id),
                   bool(config.position_encoding_2d))


def _first_index(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: whether any column is true, and the first true column (0 when none)."""
    return hit.any(dim=1), hit.int().argmax(dim=1)


def chatglm6b_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                           ids: SpecialIds) -> torch.Tensor:
    """(batch, 2, seq) positions and block positions (2-D), or (batch, seq) positions (1-D).

    `attention_mask` (batch, seq), 1 for real tokens, 0 for padding; padding columns get position 0.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    real = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
            else attention_mask[:, -length:].to(device=device, dtype=torch.bool))
    _, start = _first_index(real)
    column = torch.arange(length, device=device).expand(batch, length)
    rel = (column - start[:, None]).clamp(min=0)  # index from the row's first real token
    after_start = column >= start[:, None]
    has_bos, bos_at = _first_index((input_ids == ids.bos) & real & after_start)
    context = column < bos_at[:, None]
    has_gmask, gmask_at = _first_index((input_ids == ids.gmask) & real & after_start & context)
    has_mask, mask_at = _first_index((input_ids == ids.mask) & real & after_start & context)
    # The original indexes [gMASK] if present, else [MASK]; a row with neither uses the token before <sop>.
    mask_abs = torch.where(has_gmask, gmask_at, torch.where(has_mask, mask_at, (bos_at - 1).clamp(min=0)))
    mask_rel = (mask_abs - start).clamp(min=0)
    bos_rel = bos_at - start
    in_block = has_bos[:, None] & (column >= bos_at[:, None])
    if ids.two_d:
        position = torch.where(in_block, mask_rel[:, None], rel)
        block = torch.where(in_block, rel - bos_rel[:, None] + 1, torch.zeros_like(rel))
        out = torch.stack([position, block], dim=1)
        return out * real[:, None, :]
    fixed = in_block & ~has_gmask[:, None]
    return torch.where(fixed, mask_rel[:, None], rel) * real


class ChatGLM6BPositions:
    """Per-row state (1, 3): (position, block position, how much the position grows per token).

    After <sop> the position is fixed and the block counts; a row without <sop> (or a 1-D model's
    [gMASK] block) grows its position by one per token.
    """

    # The prompt attends both ways (prefix-LM): a prefix's keys/values change with the tokens after it.
    prompt_prefix_reusable = False

    def __init__(self, config: Any) -> None:
        self.ids = SpecialIds.of(config)

    def prefill(self, prompt_ids: list[int], device: torch.device) -> torch.Tensor:
        return chatglm6b_position_ids(torch.tensor([prompt_ids], device=device), None, self.ids)

    def first(self, prompt_ids: list[int], device: torch.device) -> torch.Tensor:
        # Two placeholder tokens (-1 is no vocabulary id) after the prompt: the first one's position is
        # the first generated token's, the difference to the second one's is the per-token growth.
        full = chatglm6b_position_ids(torch.tensor([[*prompt_ids, -1, -1]], device=device), None, self.ids)
        if self.ids.two_d:
            position, block = full[:, 0, -2], full[:, 1, -2]
            step = full[:, 0, -1] - position
        else:
            position, block = full[:, -2], torch.zeros_like(full[:, -2])
            step = full[:, -1] - position
        return torch.stack([position, block, step], dim=1)

    def as_input(self, state: torch.Tensor) -> torch.Tensor:
        return state[:, :2, None] if self.ids.two_d else state[:, :1]

    def advance(self, state: torch.Tensor) -> torch.Tensor:
        position, block, step = state.unbind(dim=1)
        return torch.stack([position + step, block + (block > 0).long(), step], dim=1)
