"""Configuration of the project's ChatGLM-6B (first generation) implementation.

Field names are the original checkpoint's config.json names, so a converted config reads like the
original; `attribute_map` gives transformers' standard names (num_hidden_layers, ...) to the code that
asks for them (the cache, generation, the engine's position window).
"""

from __future__ import annotations

from typing import ClassVar

from transformers import PreTrainedConfig

from ..families import CHATGLM6B_MODEL_TYPE


class ChatGLM6BConfig(PreTrainedConfig):
    """Sizes and special ids of a ChatGLM-6B model; the defaults are THUDM/chatglm-6b's."""

    model_type = CHATGLM6B_MODEL_TYPE
    attribute_map: ClassVar[dict[str, str]] = {
        "num_hidden_layers": "num_layers",
        "intermediate_size": "inner_hidden_size",
        "max_position_embeddings": "max_sequence_length",
        "layer_norm_eps": "layernorm_epsilon",
        "num_key_value_heads": "num_attention_heads",  # no grouped keys/values in ChatGLM-6B
    }

    vocab_size: int = 130528
    hidden_size: int = 4096
    inner_hidden_size: int = 16384
    num_layers: int = 28
    num_attention_heads: int = 32
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    # 2-D rotary positions (the [gMASK] position and a block counter); false: one rotary over the whole head.
    position_encoding_2d: bool = True
    bos_token_id: int | None = 130004  # <sop>: the first token of the generated block
    eos_token_id: int | list[int] | None = 130005  # <eop>
    mask_token_id: int = 130000  # [MASK]
    gmask_token_id: int = 130001  # [gMASK]
    pad_token_id: int | None = 3
    # The residual scale is alpha = sqrt(2 * this). The original's GLMBlock never receives num_layers and
    # keeps its default 28, so every checkpoint its code made (of any depth) was computed with sqrt(56).
    residual_alpha_layers: int = 28
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self, **kwargs):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        head_dim = self.head_dim
        # 2-D rotary splits each head in two halves, and rotary pairs the halves of each: 4 | head_dim.
        if head_dim % (4 if self.position_encoding_2d else 2):
            raise ValueError(f"head size {head_dim} must be a multiple of "
                             f"{4 if self.position_encoding_2d else 2} for rotary positions")
        super().__post_init__(**kwargs)
