"""CPU inference: linear layers whose weights are reordered once for oneDNN (what torch.compile's CPU
freezing does, without compiling anything).

On CPU, `nn.Linear` calls MKL's sgemm, which re-packs the weight matrix on every call; with the few rows
of a decode step (the batch) that packing dominates, so a batch-8 step's matmuls cost 2-4x a batch-1
step's. oneDNN with the weight laid out once at load runs a large product at 8 rows ~2-3x faster and at
1 row no slower (`python bench/cpu_linear.py` prints each layer shape; `python bench/serving.py` the whole
decode step, packed and not); small layers stay as they are (MIN_PACKED_WEIGHTS). Results agree with
`nn.Linear` to float rounding (~1e-6).

Serving only: a packed layer has no trainable weight (training loads the model itself and never calls
this), and quantised layers are not `nn.Linear`, so they are left alone.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    """`nn.Linear` for inference on CPU, its weight in oneDNN's blocked layout (a buffer, not a parameter)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self._dtype = linear.weight.dtype
        weight = linear.weight.detach().contiguous()
        # No batch-size hint: one layout serves a decode step (1-16 rows) and a prefill (hundreds) alike.
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().contiguous()
        self.register_buffer("bias", bias, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """Shape and dtype of the original weight (the engine reads them off the output layer); no data."""
        return torch.empty((self.out_features, self.in_features), dtype=self._dtype, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack(model: nn.Module) -> str:
    """Why this model's linear layers cannot be packed ("" when they can)."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN"
    params = list(model.parameters())
    if not params:
        return "the model has no parameters"
    if any(p.device.type != "cpu" for p in params):
        return "the model is not on the CPU"
    if any(p.dtype not in (torch.float32, torch.bfloat16) for p in params if p.is_floating_point()):
        return "oneDNN packing takes float32 or bfloat16 weights only"
    return ""


# Below this many weights a layer stays nn.Linear: a oneDNN call costs ~10-15 us more than an MKL one, which a
# small matrix does not win back (`python bench/cpu_linear.py`). A 6 B model's layers are all far above it.
MIN_PACKED_WEIGHTS = 1 << 18


def pack_linear_layers(model: nn.Module, min_weights: int = MIN_PACKED_WEIGHTS) -> int:
    """Replace each `nn.Linear` of a CPU model with at least `min_weights` weights by a `PackedLinear`; the
    number replaced.

    An output layer tied to the input embedding keeps its `nn.Linear` (packing would hold a second copy
    of the vocabulary matrix). Calling it again packs nothing more.
    """
    if can_pack(model):
        return 0
    tied = _tied_output_layer(model)
    names = [name for name, module in model.named_modules()
             if type(module) is nn.Linear and module is not tied and module.weight.numel() >= min_weights]
    # One layer at a time, holding names only: each original weight is freed as soon as its copy exists, so
    # start-up needs one layer's worth of extra memory, not a second model.
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, PackedLinear(getattr(parent, child)))
    return len(names)


def _tied_output_layer(model: nn.Module) -> nn.Module | None:
    """The output layer when it shares its weight with the input embedding, else None."""
    try:
        head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # not a transformers model, or remote code without them
        return None
    weight = getattr(embeddings, "weight", None)
    return head if head is not None and weight is not None and getattr(head, "weight", None) is weight else None
