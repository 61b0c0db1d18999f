"""Small models for engine tests, built once per session from the project's own text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.engine.types import ChatTurn, Finished, GenerationRequest, SamplingParams, TokenDelta


async def collect(eng: Any, message: str, params: SamplingParams,
                  history: list[ChatTurn] | None = None) -> tuple[str, Finished]:
    """One request through an engine: its whole text and its Finished event."""
    text, done = "", None
    async for event in eng.stream(GenerationRequest(message=message, history=history or [], params=params)):
        if isinstance(event, TokenDelta):
            text += event.text
        else:
            done = event
    assert done is not None
    return text, done

REMOTE_CONFIG = '''
from transformers import PretrainedConfig


class TinyRemoteConfig(PretrainedConfig):
    model_type = "tiny_remote"

    def __init__(self, vocab_size=512, hidden_size=32, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        super().__init__(**kwargs)
'''

REMOTE_MODEL = '''
import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(PreTrainedModel, GenerationMixin):
    """A ChatGLM-6B-style remote-code model: its cache is a legacy tuple, not a transformers Cache."""

    config_class = TinyRemoteConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = torch.nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_output_embeddings(self):
        return self.head

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        if past_key_values is not None:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "use_cache": True}

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, use_cache=True, **kwargs):
        seen = input_ids if past_key_values is None else torch.cat([past_key_values[0], input_ids], dim=1)
        # Each position's logits depend on the mean embedding of everything seen so far.
        steps = torch.arange(1, seen.shape[1] + 1, device=seen.device)[None, :, None]
        hidden = self.embed(seen).cumsum(dim=1) / steps
        logits = self.head(torch.tanh(hidden[:, -input_ids.shape[1]:]))
        return CausalLMOutputWithPast(logits=logits, past_key_values=(seen,))
'''


def write_remote_code_model(tokenizer_dir: Path, out_dir: Path) -> Path:
    """A model directory with its own modeling code and config.json auto_map (trust_remote_code path)."""
    import json

    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "configuration_tiny_remote.py").write_text(REMOTE_CONFIG)
    (out_dir / "modeling_tiny_remote.py").write_text(REMOTE_MODEL)
    config = {
        "model_type": "tiny_remote", "architectures": ["TinyRemoteForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                     "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"},
        "vocab_size": len(tokenizer), "hidden_size": 32,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
    }
    (out_dir / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(out_dir)
    torch.manual_seed(0)
    vocab = len(tokenizer)
    state = {"embed.weight": torch.randn(vocab, 32), "head.weight": torch.randn(vocab, 32) * 0.5,
             "head.bias": torch.zeros(vocab)}
    from safetensors.torch import save_file

    save_file(state, str(out_dir / "model.safetensors"))
    return out_dir
