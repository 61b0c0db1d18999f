"""Helpers for tests that convert the original-layout ChatGLM fixtures (../shared/models/chatglm)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import original_checkpoint


def convert_fixture(name: str, out_root: Path, *, adapter: bool = False) -> Path:
    """Convert fixture `name` (with its lora/ when asked) once into out_root; later calls reuse it."""
    from llm.convert import convert

    source = original_checkpoint(name)
    out = out_root / (name + ("-lora" if adapter else ""))
    if not (out / "config.json").is_file():
        convert(source, out, adapter=source / "lora" if adapter else None, progress=False)
    return out


def load_converted(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def max_diff(logits: torch.Tensor, golden_values: list[float]) -> float:
    return (logits.float() - torch.tensor(golden_values)).abs().max().item()


@torch.no_grad()
def greedy_ids(model, prompt_ids: list[int], steps: int, prefix_cache=None) -> list[int]:
    """Greedy decoding written out (positions from 0, an optional prefix cache), like the original's generate."""
    cache = prefix_cache
    ids = torch.tensor([prompt_ids])
    positions = torch.arange(len(prompt_ids))[None]
    out: list[int] = []
    for _ in range(steps):
        result = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True)
        cache = result.cache
        token = int(result.logits[0, -1].argmax())
        out.append(token)
        ids = torch.tensor([[token]])
        positions = positions[:, -1:] + 1
    return out
