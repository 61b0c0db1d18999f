"""ChatGLM-6B (first generation): original checkpoint → the project's own class (llm/chatglm6b).

The module names are the original's, so tensors pass through under their own names; the fused
`query_key_value` stays fused (DoctorGLM's LoRA targets it; the framework merges such an adapter
before the tensors reach this map). The rotary tables are recomputed at run time, not loaded.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..families import CHATGLM6B_MODEL_TYPE
from .base import PrefixKV

# Original config.json fields the converted config keeps (the original's names are the class's names).
_FIELDS = ("vocab_size", "hidden_size", "inner_hidden_size", "num_layers", "num_attention_heads",
           "layernorm_epsilon", "max_sequence_length", "bos_token_id", "eos_token_id", "mask_token_id",
           "gmask_token_id", "pad_token_id", "position_encoding_2d")
# Written at run time (rotary tables) or served separately (a P-tuning prefix: prefix_kv).
_DROPPED = (".rotary_emb.inv_freq", "transformer.prefix_encoder.")


class ChatGLM6BWeights:
    """llm.convert.base.WeightMap for THUDM/chatglm-6b layouts."""

    def config(self, original: dict) -> dict:
        if original.get("quantization_bit"):
            raise ValueError(
                f"this ChatGLM-6B checkpoint is quantised ({original['quantization_bit']}-bit weights): "
                "convert the fp16 checkpoint (THUDM/chatglm-6b) and quantise at load with DOCTORGLM_QUANTIZATION")
        missing = [f for f in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads") if f not in original]
        if missing:
            raise ValueError(f"ChatGLM-6B config.json lacks {', '.join(missing)}")
        config = {f: original[f] for f in _FIELDS if f in original}
        config.setdefault("inner_hidden_size", 4 * original["hidden_size"])  # the original's default
        config.update(model_type=CHATGLM6B_MODEL_TYPE, architectures=["ChatGLM6BForCausalLM"],
                      tie_word_embeddings=False, use_cache=True,
                      residual_alpha_layers=28)  # what the original's code uses at every depth
        dtype = original.get("torch_dtype") or original.get("dtype")
        if dtype:
            config["dtype"] = dtype
        return config

    def tensors(self, name: str, tensor: torch.Tensor, original: dict) -> Iterable[tuple[str, torch.Tensor]]:
        if any(part in name for part in _DROPPED):
            return []
        return [(name, tensor)]

    def prefix_kv(self, embedding: torch.Tensor, original: dict) -> PrefixKV:
        """(pre_seq_len, num_layers * 2 * hidden) → per layer (key, value), each (1, heads, P, head_dim).

        The original views the embedding as (P, layers * 2, heads, head_dim): entry 2l is layer l's
        key, entry 2l + 1 its value (modeling_chatglm.py, get_prompt).
        """
        layers, heads = int(original["num_layers"]), int(original["num_attention_heads"])
        hidden = int(original["hidden_size"])
        if embedding.dim() != 2 or embedding.shape[1] != layers * 2 * hidden:
            raise ValueError(
                f"P-tuning prefix of shape {tuple(embedding.shape)} does not fit this model "
                f"(expected (pre_seq_len, {layers * 2 * hidden}); prefix_projection checkpoints are not supported)")
        per_entry = embedding.view(embedding.shape[0], layers * 2, heads, hidden // heads).permute(1, 2, 0, 3)
        return [(per_entry[2 * i][None].contiguous(), per_entry[2 * i + 1][None].contiguous()) for i in range(layers)]


CHATGLM6B_WEIGHTS = ChatGLM6BWeights()
