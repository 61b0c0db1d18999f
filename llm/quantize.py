"""Weight-only INT8 / INT4 quantisation of an already merged model, on CPU and on CUDA.

The original DoctorGLM could not quantise its LoRA model. Here the adapter is merged first
(llm.loading.attach_adapter) and only then every nn.Linear and the input embedding are replaced in
place by modules that keep integer weights:

- int8: one scale per output channel (symmetric, -127..127).
- int4: one scale and one offset per group of GROUP_SIZES along the input features (asymmetric, 0..15),
  two values per byte. A layer whose input features no group size divides is refused before anything
  is changed (ModelLoadError at start-up, never a crash at the first request).

Why our own modules over a library (measured on 2 CPU cores, docs/engine.md has the table): the
CPU backends of bitsandbytes (int8 ~10x slower at batch 1, NF4 crashed on the default's shapes),
torchao (int8 slower than fp32, int4 only in its prototype for CPU), optimum-quanto (int4 fails under
torch.inference_mode, which the engine uses) and hqq (slow) each failed one requirement. Weights are
dequantised inside each call (what quanto's int8 does on CPU too): plain torch, so the same code runs
on CPU and CUDA, under inference_mode, with the engine's batched KV cache, and needs no wheel.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .loading import ModelLoadError

log = logging.getLogger(__name__)

METHODS = ("int8", "int4")
GROUP_SIZES = (128, 64, 32, 16)  # int4: the largest that divides a layer's input features is used
SCALE_DTYPE = torch.float16  # scales and offsets are small; fp16 halves their share of the bytes
QUANTIZED_ATTR = "doctorglm_quantization"  # set on the model once it is quantised


# ----- the integer formats -----


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: returns (q int8 [N, K], scale [N])."""
    w = weight.detach().float()
    # Round with the scale as stored, so the stored pair reproduces the weight within half a step.
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-7).to(SCALE_DTYPE)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def int4_group_size(in_features: int) -> int | None:
    return next((g for g in GROUP_SIZES if in_features % g == 0), None)


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4: returns (packed uint8 [N, K/2], scale [N, K/g], offset [N, K/g])."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group, group)
    low = w.amin(dim=2).to(SCALE_DTYPE)
    scale = ((w.amax(dim=2) - low.float()) / 15.0).clamp(min=1e-7).to(SCALE_DTYPE)
    steps = (w - low.float()[..., None]) / scale.float()[..., None]
    q = torch.round(steps).clamp(0, 15).to(torch.uint8).reshape(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.contiguous(), scale, low


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """The float weight [..., K] of packed rows [..., K/2] (leading dims: rows, or gathered token rows)."""
    q = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], scale.shape[-1], -1)
    # One fused multiply-add (~25% faster on CPU than a multiply then an add).
    w = torch.addcmul(offset.to(dtype)[..., None], q.to(dtype), scale.to(dtype)[..., None])
    return w.reshape(*packed.shape[:-1], -1)


# ----- the modules that replace nn.Linear / nn.Embedding -----


class _QuantizedWeights(nn.Module):
    """Integer weights of a [N, K] matrix; `weight` answers shape and dtype questions without memory.

    The engine reads `get_output_embeddings().weight.shape/.dtype`; a meta tensor gives both, and it
    cannot be mistaken for trainable float weights (peft refuses these modules as LoRA targets).
    """

    method: str

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, buffers: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.shape = shape
        self.compute_dtype = dtype
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)

    @property
    def weight(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.compute_dtype, device="meta")

    def dense(self) -> torch.Tensor:
        """The dequantised float weight [N, K] (on the buffers' device)."""
        if self.method == "int8":
            return self.qweight.to(self.compute_dtype) * self.scale.to(self.compute_dtype)[:, None]
        return dequantize_int4(self.qweight, self.scale, self.offset, self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.method}, shape={self.shape}, dtype={self.compute_dtype}"


class QuantizedLinear(_QuantizedWeights):
    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, buffers: dict[str, torch.Tensor],
                 bias: torch.Tensor | None, method: str) -> None:
        super().__init__(shape, dtype, buffers)
        self.method = method
        self.out_features, self.in_features = shape
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        if self.method == "int8" and self.compute_dtype != torch.float16:
            # Scaling the output instead of the weight saves a pass over the weight; fp16 could overflow.
            out = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
            return out + self.bias if self.bias is not None else out
        return F.linear(x, self.dense(), self.bias)


class QuantizedEmbedding(_QuantizedWeights):
    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, buffers: dict[str, torch.Tensor],
                 method: str, padding_idx: int | None) -> None:
        super().__init__(shape, dtype, buffers)
        self.method = method
        self.num_embeddings, self.embedding_dim = shape
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Only the looked-up rows are dequantised.
        if self.method == "int8":
            return self.qweight[ids].to(self.compute_dtype) * self.scale[ids].to(self.compute_dtype)[..., None]
        return dequantize_int4(self.qweight[ids], self.scale[ids], self.offset[ids], self.compute_dtype)


# ----- the model-level entry points -----


def is_quantized(model: Any) -> bool:
    return bool(getattr(model, QUANTIZED_ATTR, None)) or any(
        isinstance(m, _QuantizedWeights) for m in model.modules())


def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every nn.Linear and the input embedding, by qualified name."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) or (module is embedding and isinstance(module, nn.Embedding))]


def check_supported(model: nn.Module, method: str) -> None:
    """Raise ModelLoadError naming the constraint and the first layer that breaks it; change nothing."""
    if method not in METHODS:
        raise ModelLoadError(f"DOCTORGLM_QUANTIZATION={method!r}: use none, int8 or int4")
    if is_quantized(model):
        raise ModelLoadError("the model is already quantised: quantise once, after merging any adapter")
    targets = _targets(model)
    if not targets:
        raise ModelLoadError(f"{type(model).__name__} has no nn.Linear layers to quantise")
    if method == "int4":
        for name, module in targets:
            k = module.weight.shape[1]
            if int4_group_size(k) is None:
                raise ModelLoadError(
                    f"DOCTORGLM_QUANTIZATION=int4 needs every layer's input features to be a multiple of "
                    f"{min(GROUP_SIZES)} (group sizes {', '.join(map(str, GROUP_SIZES))}); {name} has {k}: "
                    "use int8 or none for this model"
                )


def _quantized_buffers(weight: torch.Tensor, method: str) -> dict[str, torch.Tensor]:
    if method == "int8":
        q, scale = quantize_int8(weight)
        return {"qweight": q, "scale": scale}
    q, scale, offset = quantize_int4(weight, int4_group_size(weight.shape[1]) or 0)
    return {"qweight": q, "scale": scale, "offset": offset}


def quantize_merged(model: Any, method: str, device: str | torch.device = "cpu") -> Any:
    """Quantise a merged model in place on `device` and return it there; refuse before changing anything.

    Each layer's float weight moves to the device, is quantised there and dropped, so peak memory on a
    GPU is the quantised model plus one float layer (a 6B model never needs its bf16 copy on the card).
    A tied output head shares the embedding's integer weights (same per-row layout), as it shared floats.
    """
    check_supported(model, method)
    device = torch.device(device)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    shared: dict[int, dict[str, torch.Tensor]] = {}  # id(float weight) -> its integer buffers
    for name, module in _targets(model):
        source = module.weight
        buffers = shared.get(id(source))
        if buffers is None:
            buffers = _quantized_buffers(source.detach().to(device), method)
            shared[id(source)] = buffers
        shape = (int(source.shape[0]), int(source.shape[1]))
        if isinstance(module, nn.Linear):
            bias = module.bias.to(device) if module.bias is not None else None
            new: nn.Module = QuantizedLinear(shape, dtype, buffers, bias, method)
        else:
            new = QuantizedEmbedding(shape, dtype, buffers, method, module.padding_idx)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    model.to(device)
    setattr(model, QUANTIZED_ATTR, method)
    log.info("quantised %d layers to %s on %s", len(shared), method, device)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (integer weights, scales, norms, biases), shared ones once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.data_ptr()
        if key in seen or tensor.device.type == "meta":
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def model_summary(model: Any) -> dict[str, str]:
    """What /readyz and /v1/models report: the compute dtype and the quantisation that is live."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return {"dtype": str(dtype).removeprefix("torch.") if dtype is not None else "unknown",
            "quantization": getattr(model, QUANTIZED_ATTR, None) or "none"}
