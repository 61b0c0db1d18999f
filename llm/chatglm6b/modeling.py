"""ChatGLM-6B (the first generation, what DoctorGLM fine-tuned) on transformers 5's PreTrainedModel and Cache API.

Written from the original modeling_chatglm.py as a specification. What makes it ChatGLM-6B and not a plain
decoder: 2-D rotary positions (each head's first half rotates with the position, its second half with
the block position; see positions.py), a prefix-LM mask (the context before <sop> attends both ways,
the rest causally), residuals from the *normalised* input scaled by alpha = sqrt(2 * 28) (the original
fixes 28 whatever the depth: config.residual_alpha_layers),
LayerNorm, a GELU (tanh) MLP, and a fused per-head q/k/v projection (`query_key_value`, where DoctorGLM's
LoRA adapters sit). Module names are the original's, so original-layout LoRA adapters apply unchanged.

The cache is a plain `DynamicCache` whose layers hold post-rotary keys and values shaped
(batch, heads, seq, head_dim): the engine splices rows and prepends P-tuning v2 prefixes in that layout.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration import ChatGLM6BConfig
from .positions import ChatGLM6BPositions, SpecialIds, chatglm6b_position_ids

Rotary = tuple[torch.Tensor, ...]


def _rotary_inv_freq(dim: int, device: torch.device) -> torch.Tensor:
    # The original keeps inv_freq in fp16 (then casts the module): its rounded values are the reference.
    exponent = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim
    return (1.0 / (10000 ** exponent)).half().float()


def _cos_sin(positions: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (batch, 1, seq, dim) for (batch, seq) positions; fp32 angles, then the model's dtype."""
    angles = positions.float()[..., None] * _rotary_inv_freq(dim, positions.device)
    emb = torch.cat([angles, angles], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def rotary_tables(position_ids: torch.Tensor, head_dim: int, two_d: bool, dtype: torch.dtype) -> Rotary:
    """Per forward: (cos, sin) for the whole head (1-D), or for each half (2-D: position, then block)."""
    if two_d:
        half = head_dim // 2
        return (*_cos_sin(position_ids[:, 0], half, dtype), *_cos_sin(position_ids[:, 1], half, dtype))
    return _cos_sin(position_ids, head_dim, dtype)


def attention_allowed(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, batch: int, length: int,
                      past: int, bos_id: int, device: torch.device) -> torch.Tensor:
    """(batch, 1, length, past + length) bool, True where a query may attend a key.

    Cached keys (earlier tokens or a P-tuning prefix) are visible to every new token. Among the new
    tokens the context (before the row's first <sop>) is visible to all of them, the rest causally.
    Padding keys (attention_mask 0) are hidden; each token always sees itself, so a padding row has
    something to attend to and stays finite.
    """
    query = torch.arange(length, device=device)
    causal = query[None, :] <= query[:, None]  # [query, key]
    new = causal.expand(batch, length, length)
    if input_ids is not None:
        is_bos = input_ids == bos_id
        if attention_mask is not None and attention_mask.shape[1] >= length:
            is_bos &= attention_mask[:, -length:].to(device=device, dtype=torch.bool)
        # No <sop> in the chunk: plain causal attention (a continuation, or text without the chat format).
        context_end = torch.where(is_bos.any(dim=1), is_bos.int().argmax(dim=1), 0)
        new = new | (query[None, None, :] < context_end[:, None, None])
    allowed = torch.cat([new.new_ones((batch, length, past)), new], dim=2)
    if attention_mask is not None:
        keys = attention_mask.to(device=device, dtype=torch.bool)
        total = past + length
        if keys.shape[1] > total:
            raise ValueError(f"attention_mask covers {keys.shape[1]} keys but there are only {total} "
                             f"({past} cached + {length} new)")
        # A mask that leaves out leading keys (a P-tuning prefix in the cache) counts them as visible.
        keys = F.pad(keys, (total - keys.shape[1], 0), value=True)
        allowed = allowed & keys[:, None, :]
        allowed[:, :, past:] |= torch.eye(length, dtype=torch.bool, device=device)
    return allowed[:, None]


class ChatGLM6BAttention(nn.Module):
    def __init__(self, config: ChatGLM6BConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.two_d = config.position_encoding_2d
        self.config = config
        inner = self.num_heads * self.head_dim
        # Per head [q | k | v] side by side: the original's strided layout, kept fused for its LoRA.
        self.query_key_value = nn.Linear(config.hidden_size, 3 * inner, bias=True)
        self.dense = nn.Linear(inner, config.hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor, rotary: Rotary, allowed: torch.Tensor,
                cache: Cache | None = None) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        mixed = self.query_key_value(hidden_states).view(batch, length, self.num_heads, 3 * self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in mixed.split(self.head_dim, dim=-1))
        if self.two_d:
            cos, sin, block_cos, block_sin = rotary
            q1, q2 = query.chunk(2, dim=-1)
            k1, k2 = key.chunk(2, dim=-1)
            query = torch.cat([_apply_rotary(q1, cos, sin), _apply_rotary(q2, block_cos, block_sin)], dim=-1)
            key = torch.cat([_apply_rotary(k1, cos, sin), _apply_rotary(k2, block_cos, block_sin)], dim=-1)
        else:
            cos, sin = rotary
            query, key = _apply_rotary(query, cos, sin), _apply_rotary(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if self.config._attn_implementation == "eager":
            context = self._eager(query, key, value, allowed)
        else:
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed,
                                                     scale=1.0 / math.sqrt(self.head_dim))
        return self.dense(context.transpose(1, 2).reshape(batch, length, -1))

    def _eager(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               allowed: torch.Tensor) -> torch.Tensor:
        # The original's query-key layer scaling: divide by (layer + 1) before the product and multiply
        # back in fp32, which keeps fp16 scores in range; in fp32 it changes nothing but rounding.
        coeff = float(self.layer_idx + 1)
        scores = (query / (math.sqrt(self.head_dim) * coeff)) @ key.transpose(-1, -2)
        scores = (scores.float() * coeff).masked_fill(~allowed, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        return probs @ value


class ChatGLM6BMLP(nn.Module):
    def __init__(self, config: ChatGLM6BConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size, bias=True)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden_states), approximate="tanh"))


class ChatGLM6BBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLM6BConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = ChatGLM6BAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = ChatGLM6BMLP(config)
        self.alpha = math.sqrt(2 * config.residual_alpha_layers)

    def forward(self, hidden_states: torch.Tensor, rotary: Rotary, allowed: torch.Tensor,
                cache: Cache | None = None) -> torch.Tensor:
        # GLM's residual: the normalised input, scaled by alpha, plus the sublayer's output.
        normed = self.input_layernorm(hidden_states)
        hidden_states = normed * self.alpha + self.attention(normed, rotary, allowed, cache)
        normed = self.post_attention_layernorm(hidden_states)
        return normed * self.alpha + self.mlp(normed)


class ChatGLM6BPreTrainedModel(PreTrainedModel):
    config_class = ChatGLM6BConfig
    config: ChatGLM6BConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["ChatGLM6BBlock"]
    _supports_sdpa = True


class ChatGLM6BModel(ChatGLM6BPreTrainedModel):
    def __init__(self, config: ChatGLM6BConfig) -> None:
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ChatGLM6BBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, **kwargs: Any) -> BaseModelOutputWithPast:
        """`position_ids`: (batch, 2, seq) for 2-D models; computed from input_ids and attention_mask
        when absent, which is right for a prompt (after a prefix too) but not for a continuation."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch, length = inputs_embeds.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if input_ids is None:
                raise ValueError("ChatGLM-6B positions come from the ids: pass position_ids with inputs_embeds")
            position_ids = chatglm6b_position_ids(input_ids, attention_mask, SpecialIds.of(self.config))
        rotary = rotary_tables(position_ids.to(inputs_embeds.device), self.config.head_dim,
                               self.config.position_encoding_2d, inputs_embeds.dtype)
        allowed = attention_allowed(input_ids, attention_mask, batch, length, past, self.config.bos_token_id,
                                    inputs_embeds.device)
        want_hidden = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        all_hidden: tuple[torch.Tensor, ...] = ()
        hidden_states = inputs_embeds
        for layer in self.layers:
            if want_hidden:
                all_hidden += (hidden_states,)
            hidden_states = layer(hidden_states, rotary, allowed, cache=cache if use_cache else None)
        hidden_states = self.final_layernorm(hidden_states)
        if want_hidden:
            all_hidden += (hidden_states,)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None,
                                       hidden_states=all_hidden or None)


class ChatGLM6BForCausalLM(ChatGLM6BPreTrainedModel, GenerationMixin):
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "transformer.word_embeddings.weight"}
    # The engine's per-row decode positions (llm.positions.position_scheme_for).
    position_scheme = ChatGLM6BPositions

    def __init__(self, config: ChatGLM6BConfig) -> None:
        super().__init__(config)
        self.transformer = ChatGLM6BModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                output_hidden_states: bool | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """`labels`: like any causal LM (shifted by one inside the loss, -100 ignored)."""
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                               output_hidden_states=output_hidden_states)
        logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, next_sequence_length: int | None = None,
                                      cache: Cache | None = None, attention_mask: torch.Tensor | None = None,
                                      inputs_embeds: torch.Tensor | None = None,
                                      is_first_iteration: bool | None = False, **kwargs: Any) -> dict[str, Any]:
        # generate() would grow position_ids by one on every axis; ChatGLM-6B's come from the whole
        # sequence instead (the [gMASK] position stays, the block position counts).
        kwargs.pop("position_ids", None)
        inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs)
        if input_ids.shape[1] and inputs.get("input_ids") is not None:
            positions = chatglm6b_position_ids(input_ids, attention_mask, SpecialIds.of(self.config))
            inputs["position_ids"] = positions[..., -inputs["input_ids"].shape[1]:]
        return inputs
