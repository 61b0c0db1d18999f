"""Merge a LoRA adapter into its base model and save a directory the service loads (DOCTORGLM_MODEL_PATH).

Quantise after merging, not before: serve the merged directory with DOCTORGLM_QUANTIZATION=int8 or int4
(llm/quantize.py, CPU or CUDA), which quantises the merged weights in place at load. LoRA
on top of an already-INT4 model cannot be merged exactly, which is what tripped the original project.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def base_of(adapter_dir: Path) -> Path:
    """The base model recorded in adapter_config.json."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    return Path(config["base_model_name_or_path"])


def merge(adapter_dir: Path, out_dir: Path, base_dir: Path | None = None, dtype: str = "auto") -> Path:
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llm.chatglm6b  # noqa: F401  (registers the project's ChatGLM-6B class for converted directories)

    adapter_dir = Path(adapter_dir)
    base_dir = Path(base_dir) if base_dir else base_of(adapter_dir)
    peft_type = str(PeftConfig.from_pretrained(adapter_dir).peft_type)
    if "LORA" not in peft_type.upper():
        raise ValueError(f"{adapter_dir} is a {peft_type} adapter: only LoRA merges into the weights "
                         "(serve P-tuning v2 prefixes with the base model and peft instead)")
    # Merge in fp32 for exactness, save in the requested dtype (auto: the dtype the base model was saved in).
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    if dtype == "auto":
        saved = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
        target = getattr(torch, str(saved.get("dtype") or saved.get("torch_dtype") or "float32"), torch.float32)
    else:
        target = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    merged = merged.to(target)
    tokenizer_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(tmp)
    info: dict[str, Any] = {"base_model": str(base_dir), "adapter": str(adapter_dir), "dtype": dtype}
    (tmp / "merge_info.json").write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
