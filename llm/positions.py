"""Position ids for the engine's step-wise decode, per model family.

Most causal LMs number tokens 0, 1, 2, ...; ChatGLM-6B uses 2-D positions (the [gMASK] position and a
block counter for generated tokens). The engine keeps one position state per row (a tensor whose first
dimension is the row) and asks the scheme for the forward's `position_ids`, so it never needs to know
which family it serves.
"""

from __future__ import annotations

from typing import Protocol

import torch


class PositionScheme(Protocol):
    # True when a prompt prefix's keys/values depend on that prefix alone (causal attention), so the engine
    # may reuse them for a later prompt that starts the same way.
    prompt_prefix_reusable: bool

    def prefill(self, prompt_ids: list[int], device: torch.device) -> torch.Tensor | None:
        """position_ids for the prompt's forward (batch 1), or None for the model's own default."""

    def first(self, prompt_ids: list[int], device: torch.device) -> torch.Tensor:
        """State of the row after its prompt: the position of the first generated token, first dim 1."""

    def as_input(self, state: torch.Tensor) -> torch.Tensor:
        """position_ids for one decode step of the batch from the rows' states."""

    def advance(self, state: torch.Tensor) -> torch.Tensor:
        """The states one token later."""


class LinearPositions:
    """0, 1, 2, ... (every model transformers ships; a P-tuning prefix does not shift them)."""

    prompt_prefix_reusable = True

    def prefill(self, prompt_ids: list[int], device: torch.device) -> torch.Tensor | None:
        return None

    def first(self, prompt_ids: list[int], device: torch.device) -> torch.Tensor:
        return torch.tensor([len(prompt_ids)], device=device)

    def as_input(self, state: torch.Tensor) -> torch.Tensor:
        return state[:, None]

    def advance(self, state: torch.Tensor) -> torch.Tensor:
        return state + 1


def position_scheme_for(model: object) -> PositionScheme:
    """The model's own scheme when its class defines one (ChatGLM-6B), else 0, 1, 2, ...

    A model's scheme is built from the model's config (ChatGLM-6B's special ids differ by checkpoint).
    """
    scheme = getattr(type(model), "position_scheme", None)
    return scheme(model.config) if scheme is not None else LinearPositions()
