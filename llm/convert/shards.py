"""Read an original checkpoint's weight files one shard at a time; write safetensors shards with an index.

Reading never unpickles code (`torch.load(weights_only=True)`), and each shard's tensors are handed out
and dropped one by one, so converting holds about one input shard in memory, never the whole checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class ShardError(ValueError):
    """The weight files of a checkpoint directory are missing or inconsistent."""


def locate_weights(source: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The checkpoint's weight files in order, and the index's weight_map (None for a single file)."""
    for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        index = source / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ShardError(f"{index} is not a weight index (no weight_map): {exc}") from exc
            files = [source / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ShardError(f"{index.name} names shards that are not in {source}: {', '.join(missing)}")
            return sorted(files), weight_map
        if (source / single).is_file():
            return [source / single], None
    found = sorted(p.name for p in source.glob("*.safetensors")) or sorted(p.name for p in source.glob("*.bin"))
    if len(found) == 1:
        return [source / found[0]], None
    if found:
        raise ShardError(f"{source} has several weight files ({', '.join(found)}) but no index json")
    raise ShardError(f"{source} has no weights (pytorch_model*.bin or *.safetensors)")


def weight_files(source: Path) -> list[Path]:
    """The checkpoint's weight files in order: from an index when there is one, else the single file."""
    return locate_weights(source)[0]


def tensor_names(source: Path) -> list[str]:
    """Every tensor name of the checkpoint: from the index, else the file's header (or its pickle)."""
    files, weight_map = locate_weights(source)
    if weight_map is not None:
        return list(weight_map)
    if files[0].suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(files[0]), framework="pt") as handle:
            return list(handle.keys())
    return [name for name, _ in iter_tensors(files[0])]


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for one weight file, each released by this reader once handed out."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            for name in list(handle.keys()):
                yield name, handle.get_tensor(name)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise ShardError(f"cannot read {path.name} as a weights-only PyTorch file: {exc}") from exc
    if not isinstance(state, dict):
        raise ShardError(f"{path.name} does not hold a state dict")
    for name in list(state):
        yield name, state.pop(name)


def file_size(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class ShardWriter:
    """Collects converted tensors and writes `model-0000i-of-0000N.safetensors` + model.safetensors.index.json."""

    def __init__(self, out_dir: Path, max_shard_bytes: int) -> None:
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._storages: set[int] = set()
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._written):
            raise ShardError(f"two tensors would be written as {name}")
        tensor = tensor.contiguous()
        # safetensors refuses two names over one storage (tied or renamed views): give each its own.
        if tensor.untyped_storage().data_ptr() in self._storages:
            tensor = tensor.clone()
        self._storages.add(tensor.untyped_storage().data_ptr())
        self._pending[name] = tensor
        if file_size(self._pending) >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write what is pending as the next shard (called at least once per input shard)."""
        from safetensors.torch import save_file

        if not self._pending:
            return
        path = self.out_dir / f"model-part-{len(self._written) + 1:05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self.total_bytes += file_size(self._pending)
        self._written.append((path, list(self._pending)))
        self._pending = {}
        self._storages = set()

    def finish(self) -> list[Path]:
        """Name the shards i-of-N and write the index transformers reads."""
        self.flush()
        count = len(self._written)
        weight_map: dict[str, str] = {}
        final: list[Path] = []
        for i, (path, names) in enumerate(self._written, start=1):
            target = path.with_name(f"model-{i:05d}-of-{count:05d}.safetensors")
            path.rename(target)
            final.append(target)
            weight_map.update(dict.fromkeys(names, target.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
        return final
