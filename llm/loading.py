"""Load a causal LM (optionally merging a peft adapter, then quantising) for the local engine."""

from __future__ import annotations

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


def load_model(model_dir: Path, *, adapter_dir: Path | None = None, dtype: str = "auto",
               device: str = "auto", quantization: str = "none", trust_remote_code: bool = False,
               cache_dir: Path | None = None) -> LoadedModel:
    """Load tokenizer + model, merge the adapter at load, quantise after the merge (llm.quantize, CPU or CUDA).

    An original ChatGLM-6B/2/3 directory is converted once into `<cache_dir>/converted/` (an original-layout
    LoRA adapter merged during the conversion) and the converted copy is served; no remote code runs. A
    P-tuning v2 checkpoint or peft prefix adapter becomes `LoadedModel.prefix`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .families import CHATGLM_6B_CONVERTED, family_of, original_family, read_config

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} has no config.json: point DOCTORGLM_MODEL_PATH at a model directory")
    try:
        config = read_config(model_dir)
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ModelLoadError(f"{model_dir}/config.json cannot be read as JSON: {exc}") from exc
    if original_family(config) is not None:
        model_dir, adapter_dir = converted_original(model_dir, adapter_dir, cache_dir)
    elif config.get("auto_map") and not trust_remote_code:  # modeling code shipped in the directory
        raise ModelLoadError(
            f"{model_dir} ships its own modeling code (config.json auto_map): "
            "review it, then set DOCTORGLM_TRUST_REMOTE_CODE=true to run it"
        )
    if family_of(model_dir) is CHATGLM_6B_CONVERTED:
        import llm.chatglm6b  # noqa: F401  (registers the project's ChatGLM-6B class with the Auto classes)
    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target_device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch_dtype, trust_remote_code=trust_remote_code, low_cpu_mem_usage=True
    )
    prefix_source = adapter_dir if adapter_dir is not None and is_prefix(adapter_dir) else None
    if adapter_dir is not None and prefix_source is None:
        model = attach_adapter(model, adapter_dir)
    if quantization != "none":
        from .quantize import quantize_merged

        model = quantize_merged(model, quantization, target_device)  # after the merge, never before
    else:
        model = model.to(target_device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prefix = load_prefix_for(model, prefix_source) if prefix_source is not None else None
    return LoadedModel(model=model, tokenizer=tokenizer, device=torch.device(target_device), name=model_dir.name,
                       prefix=prefix)


def converted_original(model_dir: Path, adapter_dir: Path | None, cache_dir: Path | None) -> tuple[Path, Path | None]:
    """(the converted copy to serve, the adapter still to apply at load): an original-layout LoRA is merged
    by the conversion, any other adapter (prefix, LoRA for the converted layout) is left for the load."""
    from .convert import ConversionError
    from .convert.cache import ensure_converted
    from .convert.original_lora import AdapterError, targets_original_layout
    from .convert.shards import ShardError
    from .paths import cache_dir as default_cache_dir

    try:
        merge_now = adapter_dir is not None and targets_original_layout(adapter_dir, model_dir)
        converted = ensure_converted(model_dir, cache_dir or default_cache_dir(), adapter_dir if merge_now else None)
    except (ConversionError, AdapterError, ShardError, OSError) as exc:
        raise ModelLoadError(f"cannot convert the original checkpoint {model_dir}: {exc}") from exc
    return converted, None if merge_now else adapter_dir


def is_prefix(adapter_dir: Path) -> bool:
    from .prefix import PrefixError, prefix_kind

    try:
        return prefix_kind(adapter_dir) is not None
    except PrefixError as exc:  # looks like a P-tuning checkpoint, but its weights cannot be read
        raise ModelLoadError(f"cannot serve the prefix in {adapter_dir}: {exc}") from exc


def load_prefix_for(model: Any, adapter_dir: Path) -> PrefixKV:
    from .prefix import PrefixError, load_prefix

    try:
        prefix = load_prefix(adapter_dir, model)
    except (PrefixError, OSError, KeyError) as exc:
        raise ModelLoadError(f"cannot serve the prefix in {adapter_dir}: {exc}") from exc
    log.info("P-tuning v2 prefix of %d tokens from %s", prefix[0][0].shape[2], adapter_dir)
    return prefix


def attach_adapter(model: Any, adapter_dir: Path) -> Any:
    """Merge a LoRA adapter into the weights; refuse adapters that cannot be merged, with what to do."""
    from peft import PeftConfig, PeftModel

    from .quantize import is_quantized

    if is_quantized(model):
        raise ModelLoadError("a LoRA adapter is merged into float weights: merge it first, then quantise")
    try:
        peft_type = str(PeftConfig.from_pretrained(adapter_dir).peft_type)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{adapter_dir} is not a peft adapter directory (adapter_config.json): {exc}") from exc
    if "LORA" not in peft_type.upper():
        raise ModelLoadError(
            f"{adapter_dir} is a {peft_type} adapter, which cannot be merged into the weights: serve LoRA "
            "adapters, P-tuning v2 checkpoints or peft prefix adapters"
        )
    log.info("merging adapter %s", adapter_dir)
    try:
        return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    except (ValueError, RuntimeError, KeyError) as exc:
        # e.g. DoctorGLM's query_key_value LoRA on an already converted ChatGLM2/3 (q/k/v split).
        raise ModelLoadError(
            f"the adapter {adapter_dir} does not fit this model ({exc}); an adapter trained on an ORIGINAL "
            "ChatGLM layout merges when DOCTORGLM_MODEL_PATH is the original directory, or with "
            "`python -m training convert SOURCE OUT --adapter ADAPTER`"
        ) from exc

