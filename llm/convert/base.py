"""The contract between the converter framework and each original family's weight map.

The framework (llm/convert/__init__.py) reads an original checkpoint shard by shard, merges an
original-layout LoRA at state-dict level, and hands every tensor to the family's map, which renames,
splits or drops it; it writes what comes back as safetensors shards. It never runs the checkpoint's code.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

# Per layer: (key, value), each shaped (1, kv_heads, prefix_len, head_dim): the layout of the converted
# model's DynamicCache layers, so the engine can prepend a P-tuning v2 prefix to every row.
PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]


class WeightMap(Protocol):
    def config(self, original: dict) -> dict:
        """config.json of the converted directory (transformers 5 loads it with no remote code)."""

    def tensors(self, name: str, tensor: torch.Tensor, original: dict) -> Iterable[tuple[str, torch.Tensor]]:
        """The converted tensors for one original tensor (renamed, split or none at all)."""

    def prefix_kv(self, embedding: torch.Tensor, original: dict) -> PrefixKV:
        """A P-tuning v2 prefix (transformer.prefix_encoder.embedding.weight, prefix_projection false)."""
