"""P-tuning v2 prefixes as per-layer key/value tensors (PrefixKV) that the engine prepends to every row.

Two sources:
- a checkpoint as ChatGLM's own `ptuning/main.py` leaves it (what DoctorGLM released): config.json (the
  whole original model config plus `pre_seq_len`, `prefix_projection`) and a weights file holding only
  `transformer.prefix_encoder.*`. The family's map turns the embedding into keys/values; the original
  model numbers the prompt's positions from 0, as the engine does.
- a peft PrefixTuning adapter (`python -m training train --method ptuning`). peft shifts every position
  by the prefix length; rotary attention depends only on the distance between a query and a rotated key,
  and the prefix keys are never rotated, so rotating them once by minus the prefix length makes serving
  from position 0 compute what peft computed in training.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import torch

from .convert.base import PrefixKV
from .families import CHATGLM6B_MODEL_TYPE, original_family

PTUNING_PREFIX = "transformer.prefix_encoder."
PTUNING_EMBEDDING = PTUNING_PREFIX + "embedding.weight"
PEFT_PREFIX_EMBEDDING = "prompt_embeddings"


class PrefixError(ValueError):
    """The directory is not a usable prefix for this model; the message says what is wrong."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return {}


def _ptuning_weights_file(folder: Path) -> Path | None:
    for name in ("pytorch_model.bin", "model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise PrefixError(f"cannot read {path} as weights: {exc}") from exc


def prefix_kind(folder: Path) -> Literal["ptuning", "peft"] | None:
    """"ptuning" for a ChatGLM ptuning/main.py checkpoint, "peft" for a peft PrefixTuning adapter, else None."""
    folder = Path(folder)
    adapter = _read_json(folder / "adapter_config.json")
    if adapter:
        return "peft" if str(adapter.get("peft_type", "")).upper() == "PREFIX_TUNING" else None
    config = _read_json(folder / "config.json")
    # A full model directory can carry pre_seq_len too: only a small file of prefix weights is a checkpoint.
    weights = _ptuning_weights_file(folder)
    if not config.get("pre_seq_len") or weights is None or weights.stat().st_size > 512 * 1024**2:
        return None
    return "ptuning" if all(k.startswith(PTUNING_PREFIX) for k in _load_state(weights)) else None


def _project(state: dict[str, torch.Tensor], embedding: torch.Tensor) -> torch.Tensor:
    """prefix_projection=true: the prefix encoder's MLP (Linear, tanh, Linear) applied to the embedding."""
    names = [PTUNING_PREFIX + f"trans.{i}.{kind}" for i in (0, 2) for kind in ("weight", "bias")]
    missing = [n for n in names if n not in state]
    if missing:
        raise PrefixError(f"prefix_projection is true but the checkpoint lacks {', '.join(missing)}")
    w0, b0, w2, b2 = (state[n].float() for n in names)
    return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(embedding, w0, b0)), w2, b2)


def load_ptuning(folder: Path) -> PrefixKV:
    """A ChatGLM ptuning/main.py checkpoint → PrefixKV, through the family's weight map."""
    from .convert import weight_map_for

    folder = Path(folder)
    config = _read_json(folder / "config.json")
    family = original_family(config)
    if family is None:
        raise PrefixError(f"{folder}/config.json is not an original ChatGLM-6B/2/3 config: cannot tell the "
                          "prefix's layout")
    weights = _ptuning_weights_file(folder)
    if weights is None:
        raise PrefixError(f"{folder} has no pytorch_model.bin with the prefix encoder")
    state = _load_state(weights)
    if PTUNING_EMBEDDING not in state:
        raise PrefixError(f"{weights} has no {PTUNING_EMBEDDING}")
    embedding = state[PTUNING_EMBEDDING].float()
    if embedding.shape[0] != int(config["pre_seq_len"]):
        raise PrefixError(f"{weights}: {embedding.shape[0]} prefix rows, config.json says pre_seq_len "
                          f"{config['pre_seq_len']}")
    if config.get("prefix_projection"):
        embedding = _project(state, embedding)
    try:
        return weight_map_for(family).prefix_kv(embedding, config)
    except ValueError as exc:  # the embedding's width does not fit the layout its config.json describes
        raise PrefixError(f"{weights}: {exc}") from exc


def _compute_param(model: Any) -> torch.Tensor:
    """A floating-point parameter: the device and compute dtype (a quantised model's int8 weights are neither)."""
    return next(p for p in model.parameters() if p.is_floating_point())


def _rotary_parts(model: Any) -> tuple[Any, Any]:
    """The model's rotary module and its modeling file's apply_rotary_pos_emb (Llama-style models)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    rotary = getattr(decoder, "rotary_emb", None)
    apply = getattr(sys.modules.get(type(model).__module__), "apply_rotary_pos_emb", None)
    if rotary is None or apply is None:
        raise PrefixError(f"peft prefix adapters are served for rotary models with 1-D positions; "
                          f"{type(model).__name__} is not one")
    return rotary, apply


def load_peft_prefix(folder: Path, model: Any) -> PrefixKV:
    """A peft PrefixTuning adapter → PrefixKV for serving from position 0 (see the module docstring)."""
    folder = Path(folder)
    config = _read_json(folder / "adapter_config.json")
    if config.get("prefix_projection"):
        raise PrefixError(f"{folder}: peft prefix_projection=true adapters are not supported; train with "
                          "prefix_projection false (the default of `python -m training train --method ptuning`)")
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            state = _load_state(folder / name)
            break
    else:
        raise PrefixError(f"{folder} has no adapter_model.safetensors or adapter_model.bin")
    if PEFT_PREFIX_EMBEDDING not in state:
        raise PrefixError(f"{folder}: no {PEFT_PREFIX_EMBEDDING} in the adapter weights")
    embedding = state[PEFT_PREFIX_EMBEDDING].float()
    cfg = model.config
    layers, kv_heads = int(cfg.num_hidden_layers), int(cfg.num_key_value_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    length = embedding.shape[0]
    if embedding.shape[1] != layers * 2 * kv_heads * head_dim:
        raise PrefixError(f"{folder}: prefix width {embedding.shape[1]} does not fit this model "
                          f"({layers} layers x 2 x {kv_heads} kv heads x {head_dim})")
    # peft's layout: [token, layer*2 + (0 key | 1 value), kv head, head_dim]
    view = embedding.reshape(length, layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)
    if getattr(cfg, "model_type", None) == CHATGLM6B_MODEL_TYPE:
        # ChatGLM-6B numbers positions from its ids, so under peft the prompt already started at 0 and
        # the prefix keys were attended as they are: serve them unchanged.
        return [(view[2 * i].unsqueeze(0).contiguous(), view[2 * i + 1].unsqueeze(0).contiguous())
                for i in range(layers)]
    rotary, apply = _rotary_parts(model)
    keys = view[0::2]  # (layers, kv_heads, length, head_dim)
    positions = torch.full((1, length), -length, dtype=torch.long)
    param = _compute_param(model)
    with torch.no_grad():
        cos, sin = rotary(keys.to(param.device, param.dtype), positions.to(param.device))
        rotated, _ = apply(keys.to(param.device, param.dtype), keys.to(param.device, param.dtype), cos, sin)
    rotated = rotated.float().cpu()
    return [(rotated[i].unsqueeze(0).contiguous(), view[2 * i + 1].unsqueeze(0).contiguous())
            for i in range(layers)]


def check_fits(prefix: PrefixKV, model: Any, source: Path) -> None:
    """The prefix's layers, kv heads and head size against the model's config (clear error, not a crash)."""
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None)
    head_dim = getattr(cfg, "head_dim", None)
    key = prefix[0][0]
    found = (len(prefix), key.shape[1], key.shape[3])
    wanted = (layers, kv_heads, head_dim)
    if any(w is not None and int(w) != f for w, f in zip(wanted, found, strict=True)):
        raise PrefixError(f"the prefix in {source} has (layers, kv heads, head size) {found}, the model {wanted}: "
                          "it was trained for another model")


def load_prefix(folder: Path, model: Any) -> PrefixKV:
    """Either kind of prefix, checked against the model, in the model's dtype and on its device."""
    kind = prefix_kind(folder)
    if kind is None:
        raise PrefixError(f"{folder} is neither a P-tuning v2 checkpoint nor a peft prefix adapter")
    prefix = load_ptuning(folder) if kind == "ptuning" else load_peft_prefix(folder, model)
    check_fits(prefix, model, folder)
    param = _compute_param(model)
    return [(k.to(param.device, param.dtype), v.to(param.device, param.dtype)) for k, v in prefix]


def prefix_cache(prefix: PrefixKV, batch_size: int = 1, config: Any = None) -> Any:
    """A DynamicCache holding the prefix for `batch_size` rows; feed the prompt with position ids from 0."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k.expand(batch_size, -1, -1, -1).contiguous(),
                                         v.expand(batch_size, -1, -1, -1).contiguous()) for k, v in prefix],
                        config=config)
