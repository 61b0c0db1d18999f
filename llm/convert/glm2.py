"""ChatGLM2-6B / ChatGLM3-6B (original layout) → transformers' own GlmForCausalLM (model_type "glm").

The two generations share one architecture: RMSNorm, rotary embedding on the first half of each head,
applied to interleaved pairs (GLM's `rotate_half` does the same), multi-query attention with
`multi_query_group_num` key/value groups, SwiGLU MLP (gate first, then up, as GLM's `gate_up_proj`
expects). `apply_query_key_layer_scaling` divides the scores by the layer number and multiplies them back,
so the attention is plain 1/sqrt(head_dim). What differs is the tokenizer, not the weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from .base import PrefixKV


class UnsupportedCheckpoint(ValueError):
    """The original config uses a variant the converted architecture cannot express."""


_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_TOP_RENAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
# Recomputed by the converted model from its config.
_DROPPED = {"transformer.rotary_pos_emb.inv_freq"}


def head_layout(original: dict) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head size) of an original ChatGLM2/3 config."""
    heads = int(original["num_attention_heads"])
    head_dim = int(original.get("kv_channels") or original["hidden_size"] // heads)
    kv_heads = int(original["multi_query_group_num"]) if original.get("multi_query_attention") else heads
    return heads, kv_heads, head_dim


def _check_supported(original: dict) -> None:
    if int(original.get("quantization_bit") or 0) not in (0, 16, 32):
        raise UnsupportedCheckpoint(
            f"this checkpoint was quantised to {original['quantization_bit']} bits by its own code (e.g. "
            "chatglm2-6b-int4): convert the fp16 checkpoint and set DOCTORGLM_QUANTIZATION=int8/int4 instead"
        )
    problems = []
    if not original.get("rmsnorm", True):
        problems.append("rmsnorm=false (LayerNorm)")
    if original.get("add_bias_linear"):
        problems.append("add_bias_linear=true (biases on the output and MLP projections)")
    if original.get("apply_residual_connection_post_layernorm"):
        problems.append("apply_residual_connection_post_layernorm=true")
    if not original.get("post_layer_norm", True):
        problems.append("post_layer_norm=false")
    if problems:
        raise UnsupportedCheckpoint(
            "this ChatGLM2/3 variant has no counterpart in transformers' GLM classes: " + ", ".join(problems)
        )


class Glm2Weights:
    """The WeightMap for ChatGLM2-6B and ChatGLM3-6B (see llm/convert/base.py)."""

    def config(self, original: dict) -> dict:
        from transformers import GlmConfig

        _check_supported(original)
        heads, kv_heads, head_dim = head_layout(original)
        dtype = str(original.get("torch_dtype") or original.get("dtype") or "float32")
        config = GlmConfig(
            vocab_size=int(original["padded_vocab_size"]),
            hidden_size=int(original["hidden_size"]),
            intermediate_size=int(original["ffn_hidden_size"]),
            num_hidden_layers=int(original["num_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            hidden_act="silu",
            max_position_embeddings=int(original.get("seq_length", 2048)),
            rms_norm_eps=float(original.get("layernorm_epsilon", 1e-5)),
            attention_bias=bool(original.get("add_qkv_bias", False)),
            # ChatGLM3-6B-32k and later scale the rotary base with rope_ratio.
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * float(original.get("rope_ratio", 1)),
                             "partial_rotary_factor": 0.5},
            pad_token_id=original.get("pad_token_id", 0),
            eos_token_id=original.get("eos_token_id", 2),
            tie_word_embeddings=False,
            architectures=["GlmForCausalLM"],
            dtype=dtype,
        )
        return config.to_dict()

    def tensors(self, name: str, tensor: torch.Tensor, original: dict) -> Iterable[tuple[str, torch.Tensor]]:
        if name in _DROPPED:
            return []
        if name in _TOP_RENAMES:
            return [(_TOP_RENAMES[name], tensor)]
        match = _LAYER.match(name)
        if match is None:
            raise KeyError(name)
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest in _LAYER_RENAMES:
            return [(prefix + _LAYER_RENAMES[rest], tensor)]
        if rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = split_qkv(tensor, original)
            return [(f"{prefix}self_attn.{proj}_proj.{kind}", part) for proj, part in (("q", q), ("k", k), ("v", v))]
        raise KeyError(name)

    def prefix_kv(self, embedding: torch.Tensor, original: dict) -> PrefixKV:
        """ChatGLM2/3's get_prompt: (pre_seq_len, layers*2*groups*head_dim) → per layer (key, value)."""
        _, kv_heads, head_dim = head_layout(original)
        layers = int(original["num_layers"])
        expected = layers * 2 * kv_heads * head_dim
        if embedding.dim() != 2 or embedding.shape[1] != expected:
            raise ValueError(
                f"prefix embedding has shape {tuple(embedding.shape)}, expected (pre_seq_len, {expected}) = "
                f"(pre_seq_len, {layers} layers x 2 x {kv_heads} groups x {head_dim}) for this model"
            )
        # [prefix, layer*2 + (0 key | 1 value), group, head_dim] → per layer [1, group, prefix, head_dim]
        view = embedding.reshape(embedding.shape[0], layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)
        return [(view[2 * i].unsqueeze(0).contiguous(), view[2 * i + 1].unsqueeze(0).contiguous())
                for i in range(layers)]


def split_qkv(fused: torch.Tensor, original: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused query_key_value weight (rows = outputs) or bias into q, k and v.

    Multi-query: all query heads' rows first, then the key groups', then the value groups'. Without
    multi-query the original views the output as (heads, 3 * head_dim): q, k, v interleave per head.
    """
    heads, kv_heads, head_dim = head_layout(original)
    rows = fused.shape[0]
    if original.get("multi_query_attention"):
        sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        if rows != sum(sizes):
            raise ValueError(f"query_key_value has {rows} rows, expected {sum(sizes)} for {heads} heads, "
                             f"{kv_heads} groups of {head_dim}")
        q, k, v = torch.split(fused, sizes, dim=0)
    else:
        if rows != 3 * heads * head_dim:
            raise ValueError(f"query_key_value has {rows} rows, expected {3 * heads * head_dim}")
        per_head = fused.reshape(heads, 3, head_dim, *fused.shape[1:])
        q, k, v = (per_head[:, i].reshape(heads * head_dim, *fused.shape[1:]) for i in range(3))
    return q.contiguous(), k.contiguous(), v.contiguous()


GLM2_WEIGHTS = Glm2Weights()
