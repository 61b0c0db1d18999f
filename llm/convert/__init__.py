"""Convert THUDM's original ChatGLM checkpoints into directories transformers 5 loads without remote code.

`convert(source, out, adapter=...)` reads the original directory without executing any of its code:
config.json tells the family, the weight files are read one shard at a time, an original-layout LoRA is
merged into the fused tensors before the family's map (llm/convert/base.py) renames or splits them, and
the result is written as safetensors shards in the checkpoint's dtype with config.json, the tokenizer
and generation_config.json.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..families import CHATGLM2, CHATGLM3, CHATGLM_6B, Family, original_family, read_config
from .base import WeightMap
from .original_lora import AdapterError, OriginalLora
from .shards import ShardError, ShardWriter, iter_tensors, locate_weights

log = logging.getLogger(__name__)

# Bump when the converted output changes, so cached conversions (llm/loading.py) are redone.
CONVERTER_VERSION = "1"
CONVERSION_INFO = "conversion.json"
# Output shards close at this size, and at the end of every input shard.
MAX_SHARD_BYTES = 2 * 1024**3


class ConversionError(RuntimeError):
    """The source directory (or adapter) cannot be converted; the message says what is wrong."""


@dataclass
class ConversionResult:
    out_dir: Path
    family: Family
    seconds: float
    shards: int
    tensors: int
    adapter: Path | None


def weight_map_for(family: Family) -> WeightMap:
    """The family's map from original to converted tensors (ChatGLM-6B's lives with its model class)."""
    if family in (CHATGLM2, CHATGLM3):
        from .glm2 import GLM2_WEIGHTS

        return GLM2_WEIGHTS
    if family is CHATGLM_6B:
        from .chatglm6b import CHATGLM6B_WEIGHTS

        return CHATGLM6B_WEIGHTS
    raise ConversionError(f"no converter for the {family.name} family")


def original_config(source: Path) -> tuple[dict, Family]:
    """The original config.json and its family; ConversionError when it is not an original ChatGLM."""
    source = Path(source)
    if not (source / "config.json").is_file():
        raise ConversionError(f"{source} has no config.json: not a checkpoint directory")
    try:
        config = read_config(source)
    except ValueError as exc:
        raise ConversionError(f"{source}/config.json is not valid JSON: {exc}") from exc
    family = original_family(config, source)
    if family is None:
        raise ConversionError(
            f"{source} is not an original ChatGLM-6B/2/3 checkpoint (config.json model_type "
            f"{config.get('model_type')!r}); transformers loads it as it is, without converting"
        )
    return config, family


def _progress_bar(total: int, enabled: bool | None):
    from tqdm import tqdm

    # Quiet in logs and pipes: only a terminal gets a bar.
    disable = not sys.stdout.isatty() if enabled is None else not enabled
    return tqdm(total=total, unit="tensor", desc="converting", disable=disable, leave=False)


def _write_tokenizer(source: Path, family: Family, config: dict, out: Path) -> None:
    from .tokenizer import convert_tokenizer, write_generation_config

    convert_tokenizer(source, family, out)
    write_generation_config(source, family, config, out)


def convert(source: Path, out: Path, *, adapter: Path | None = None, progress: bool | None = None,
            max_shard_bytes: int = MAX_SHARD_BYTES) -> ConversionResult:
    """Convert the original checkpoint `source` (optionally merging an original-layout LoRA) into `out`.

    `out` must not exist or be empty; the work happens in `<out>.partial`, renamed when complete, so a
    failed or interrupted conversion never leaves a directory that looks finished.
    """
    start = time.perf_counter()
    source, out = Path(source), Path(out)
    config, family = original_config(source)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out} exists and is not empty: choose a new output directory")
    weights = weight_map_for(family)
    try:
        lora = OriginalLora.load(adapter) if adapter is not None else None
        files, index = locate_weights(source)
    except (AdapterError, ShardError) as exc:
        raise ConversionError(str(exc)) from exc
    try:
        converted_config = weights.config(config)
    except (KeyError, ValueError) as exc:
        detail = f"it lacks the field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ConversionError(f"{source}/config.json cannot be converted: {detail}") from exc

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _write_tokenizer(source, family, config, partial)  # first: a tokenizer it cannot read fails in seconds
        writer = ShardWriter(partial, max_shard_bytes)
        count = 0
        # A single file has no index: the bar counts up without a total.
        with _progress_bar(len(index or {}), progress) as bar:
            for path in files:
                for name, tensor in iter_tensors(path):
                    if lora is not None:
                        tensor = lora.apply(name, tensor)
                    try:
                        produced = list(weights.tensors(name, tensor, config))
                    except KeyError as exc:
                        raise ConversionError(f"{path.name}: unexpected tensor {name} for {family.name}") from exc
                    for new_name, new_tensor in produced:
                        writer.add(new_name, new_tensor)
                        count += 1
                    del tensor, produced
                    bar.update(1)
                writer.flush()  # one input shard in memory at a time
        if lora is not None and lora.unused():
            raise ConversionError(f"the adapter {adapter} targets tensors the checkpoint does not have: "
                                  f"{', '.join(lora.unused()[:4])}")
        shards = writer.finish()
        (partial / "config.json").write_text(json.dumps(converted_config, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
        seconds = time.perf_counter() - start
        info = {"converter_version": CONVERTER_VERSION, "family": family.name, "source": str(source.resolve()),
                "adapter": str(Path(adapter).resolve()) if adapter else None, "tensors": count,
                "shards": len(shards), "seconds": round(seconds, 3)}
        (partial / CONVERSION_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    except (ShardError, AdapterError, ValueError, FileNotFoundError) as exc:  # FileNotFoundError: no tokenizer
        shutil.rmtree(partial, ignore_errors=True)
        raise ConversionError(str(exc)) from exc
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    partial.rename(out)
    log.info("converted %s (%s) in %.2f s: %d tensors, %d shards", source.name, family.name, seconds, count,
             len(shards))
    return ConversionResult(out, family, seconds, len(shards), count, Path(adapter) if adapter else None)
