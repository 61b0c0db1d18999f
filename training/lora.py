"""LoRA with the paper's defaults via peft."""

from __future__ import annotations

from typing import Any

from .config import CHATGLM_FUSED_TARGETS, NATIVE_GLM_TARGETS, TrainConfig


def default_targets(model: Any) -> list[str]:
    """q_proj,v_proj on native GLM (and Llama-style models); query_key_value on ChatGLM-6B/2/3 remote code,
    where peft then adapts q, k and v together because they share one fused Linear."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if {"q_proj", "v_proj"} <= names:
        return list(NATIVE_GLM_TARGETS)
    if "query_key_value" in names:
        return list(CHATGLM_FUSED_TARGETS)
    raise ValueError("no q_proj/v_proj or query_key_value modules found: pass --target-modules")


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
