"""A peft LoRA adapter trained on an ORIGINAL ChatGLM layout (DoctorGLM's: `query_key_value`, r 8, α 16),
merged into the original tensors at state-dict level, before the family map splits or renames them.

W' = W + scale · B @ A with scale = α / r (α / √r with rslora), which is what peft's merge computes;
no model code is needed, so it works for layouts transformers has no class for.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """The adapter directory cannot be merged into an original checkpoint; the message says why."""


def adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"{adapter_dir} has no adapter_config.json: not a peft adapter")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from exc


def adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    adapter_dir = Path(adapter_dir)
    safetensors, pickled = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    try:
        if safetensors.is_file():
            from safetensors.torch import load_file

            return load_file(str(safetensors))
        if pickled.is_file():
            return torch.load(pickled, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise AdapterError(f"cannot read the adapter weights in {adapter_dir}: {exc}") from exc
    raise AdapterError(f"{adapter_dir} has no adapter_model.safetensors or adapter_model.bin")


def lora_module_names(weights: dict[str, torch.Tensor]) -> set[str]:
    """The adapted modules, named as in the base checkpoint (peft's `base_model.model.` stripped)."""
    modules = set()
    for key in weights:
        match = _LORA_KEY.match(key.removeprefix(_PEFT_PREFIX))
        if match:
            modules.add(match["module"])
    return modules


def _alpha_for(module: str, config: dict) -> float:
    # peft matches pattern keys against the end of the module name.
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(config["lora_alpha"])


@dataclass
class OriginalLora:
    """Per original tensor name, the delta to add (fp32)."""

    source: Path
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def load(cls, adapter_dir: Path) -> OriginalLora:
        config = adapter_config(adapter_dir)
        if "LORA" not in str(config.get("peft_type", "")).upper():
            raise AdapterError(f"{adapter_dir} is a {config.get('peft_type')} adapter, not LoRA")
        if config.get("use_dora"):
            raise AdapterError(f"{adapter_dir} is a DoRA adapter: its magnitude vectors are not supported")
        if config.get("bias", "none") != "none" or config.get("modules_to_save"):
            raise AdapterError(f"{adapter_dir} trains biases or whole modules (bias/modules_to_save): "
                               "only plain LoRA matrices are merged")
        weights = adapter_weights(adapter_dir)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in weights.items():
            match = _LORA_KEY.match(key.removeprefix(_PEFT_PREFIX))
            if match is None:
                raise AdapterError(f"{adapter_dir}: unexpected tensor {key} (only lora_A/lora_B are merged)")
            parts.setdefault(match["module"], {})[match["part"]] = tensor
        if not parts:
            raise AdapterError(f"{adapter_dir} holds no LoRA weights")
        lora = cls(Path(adapter_dir))
        for module, pair in parts.items():
            if set(pair) != {"A", "B"}:
                raise AdapterError(f"{adapter_dir}: {module} lacks lora_A or lora_B")
            a, b = pair["A"].float(), pair["B"].float()
            rank = a.shape[0]
            alpha = _alpha_for(module, config)
            scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
            delta = (b @ a) * scale
            lora.deltas[module + ".weight"] = delta.T if config.get("fan_in_fan_out") else delta
        return lora

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor with its delta merged (in fp32, back in the tensor's dtype); others unchanged."""
        delta = self.deltas.pop(name, None)
        if delta is None:
            return tensor
        if delta.shape != tensor.shape:
            raise AdapterError(f"{self.source}: the LoRA for {name} has shape {tuple(delta.shape)}, "
                               f"the checkpoint's tensor {tuple(tensor.shape)}: trained on another model size?")
        return (tensor.float() + delta).to(tensor.dtype)

    def unused(self) -> list[str]:
        """Targets the checkpoint never offered (called after every tensor has been seen)."""
        return sorted(self.deltas)


def targets_original_layout(adapter_dir: Path, checkpoint: Path) -> bool:
    """True when a LoRA adapter's modules are tensors of the original checkpoint (merge before converting).

    The checkpoint's tensor names are read only for a LoRA adapter (a P-tuning prefix needs none).
    """
    from .shards import tensor_names

    try:
        config = adapter_config(adapter_dir)
    except AdapterError:
        return False
    if "LORA" not in str(config.get("peft_type", "")).upper():
        return False
    modules = lora_module_names(adapter_weights(adapter_dir))
    if not modules:
        return False
    original_names = set(tensor_names(checkpoint))
    return all(m + ".weight" in original_names for m in modules)
