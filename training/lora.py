"""LoRA with the paper's defaults via peft."""

from __future__ import annotations

from typing import Any

from llm.families import family_from_config

from .config import TrainConfig


def default_targets(model: Any) -> list[str]:
    """The model family's LoRA targets, named once in llm/families.py (serving and training agree)."""
    family = family_from_config(model.config.to_dict())
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if not set(family.lora_targets) <= names:
        raise ValueError(f"the {family.name} family's LoRA targets {', '.join(family.lora_targets)} are not "
                         "modules of this model: pass --target-modules")
    return list(family.lora_targets)


def apply_lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules or default_targets(model),
        bias="none",
    )
    return get_peft_model(model, config)
