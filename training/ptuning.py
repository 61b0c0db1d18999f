"""P-tuning v2 (the paper's comparison) = peft PrefixTuning: trained key/value prefixes in every layer.

A prefix cannot be merged into the weights: serve it with the base model and a PeftModel wrapper, or prefer
LoRA, which merges (the service's DOCTORGLM_ADAPTER_PATH expects a LoRA adapter).
"""

from __future__ import annotations

from typing import Any

from .config import TrainConfig


def apply_prefix_tuning(model: Any, cfg: TrainConfig) -> Any:
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    # prefix_projection=False is P-tuning v2 as ChatGLM-6B ships it (no reparametrisation MLP).
    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.pre_seq_len,
                                prefix_projection=False)
    return get_peft_model(model, config)
