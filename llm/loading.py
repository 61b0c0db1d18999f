"""Load a causal LM (optionally merging a peft adapter, then quantising) for the local engine."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .convert.base import PrefixKV

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model directory cannot be loaded as configured; the message says what to change."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: Any
    name: str
    # A P-tuning v2 prefix (DOCTORGLM_ADAPTER_PATH = a P-tuning checkpoint): the engine prepends these
    # keys/values to every row's cache; the prompt's positions still start at 0.
    prefix: PrefixKV | None = None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("DOCTORGLM_DEVICE=cuda but no CUDA device is visible: use auto or cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def needs_remote_code(model_dir: Path) -> bool:
    """True when config.json names modeling code shipped in the directory (ChatGLM-6B/2/3 style)."""
    config = model_dir / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text(encoding="utf-8"))
    return bool(data.get("auto_map"))


def load_model(model_dir: Path, *, adapter_dir: Path | None = None, dtype: str = "auto",
               device: str = "auto", quantization: str = "none", trust_remote_code: bool = False) -> LoadedModel:
    """Load tokenizer + model, merge the adapter at load, quantise after the merge (CUDA only)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} has no config.json: point DOCTORGLM_MODEL_PATH at a model directory")
    if needs_remote_code(model_dir) and not trust_remote_code:
        raise ModelLoadError(
            f"{model_dir} ships its own modeling code (config.json auto_map, e.g. ChatGLM-6B/2/3): "
            "review it, then set DOCTORGLM_TRUST_REMOTE_CODE=true to run it"
        )
    target_device = resolve_device(device)
    if quantization != "none" and target_device != "cuda":
        raise ModelLoadError(
            f"DOCTORGLM_QUANTIZATION={quantization} needs a CUDA GPU (bitsandbytes); use none on CPU"
        )
    torch_dtype = resolve_dtype(dtype, target_device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch_dtype, trust_remote_code=trust_remote_code, low_cpu_mem_usage=True
    )
    if adapter_dir is not None:
        model = attach_adapter(model, adapter_dir)
    model = quantize_merged(model, quantization) if quantization != "none" else model.to(target_device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, device=torch.device(target_device), name=model_dir.name)


def attach_adapter(model: Any, adapter_dir: Path) -> Any:
    """Merge a LoRA adapter into the weights; refuse adapters that cannot be merged, with what to do."""
    from peft import PeftConfig, PeftModel

    try:
        peft_type = str(PeftConfig.from_pretrained(adapter_dir).peft_type)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{adapter_dir} is not a peft adapter directory (adapter_config.json): {exc}") from exc
    if "LORA" not in peft_type.upper():
        raise ModelLoadError(
            f"{adapter_dir} is a {peft_type} adapter, which cannot be merged into the weights: serve LoRA "
            "adapters, or export a P-tuning model with `python -m training merge` first"
        )
    log.info("merging adapter %s", adapter_dir)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def quantize_merged(model: Any, quantization: str) -> Any:
    """Quantise an already merged model with bitsandbytes (the original could not do LoRA + INT4).

    The merged weights are saved to a temporary directory and reloaded with a quantisation config,
    which is the path bitsandbytes supports for every architecture transformers knows.
    """
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError("quantisation needs bitsandbytes: pip install '.[gpu]'") from exc
    config = (
        BitsAndBytesConfig(load_in_8bit=True)
        if quantization == "int8"
        else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=model.dtype)
    )
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=config, device_map="cuda:0",
                                                    dtype=model.dtype)
