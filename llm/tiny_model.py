"""Builds the small GLM-architecture model that tests, CI and the embedded default run on.

Real deployments mount their own weights; this module only makes a model of the same architecture
(transformers' native GlmForCausalLM) with a byte-level BPE tokenizer trained on local text, so the
real load / merge / batch / stream code is what runs everywhere. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from .paths import REPO_ROOT

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, "<|user|>", "<|assistant|>"]

# Sizes by name: (hidden, layers, heads, kv_heads, intermediate). "tiny" is ~6.6M parameters with a
# vocabulary of 8,192 and decodes at hundreds of tokens/s on 2 CPU cores.
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "micro": (64, 2, 2, 1, 128),
    "tiny": (256, 4, 4, 2, 688),
    "small": (768, 12, 12, 4, 2048),
}
BUILD_VERSION = "1"  # bump to invalidate cached default models when this recipe changes


def local_corpus_files() -> list[Path]:
    """The project's own text: the sample library and the sample dialogues."""
    data = REPO_ROOT / "knowledge" / "data"
    return [p for p in (data / "sample_diseases.jsonl", data / "sample_dialogues.jsonl") if p.is_file()]


def iter_jsonl_records(paths: Iterable[Path]) -> Iterator[dict]:
    """Every JSON object of every JSONL file; lines that are not objects are skipped."""
    for path in paths:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    yield record


def iter_jsonl_text(paths: Iterable[Path]) -> Iterator[str]:
    """Every string value of every JSONL record (lists flattened)."""
    for record in iter_jsonl_records(paths):
        for value in record.values():
            if isinstance(value, str) and value:
                yield value
            elif isinstance(value, list):
                yield "、".join(str(v) for v in value)


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 8192) -> None:
    """Train a byte-level BPE tokenizer on local text and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # No NFKC: it would turn the Chinese comma into an ASCII one.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, padding_side="left"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)


def build_glm(tokenizer_dir: Path, out_dir: Path, size: str = "tiny", seed: int = 0,
              max_positions: int = 4096) -> Path:
    """Create a randomly initialised GlmForCausalLM matching the tokenizer and save it beside it."""
    import torch
    from transformers import AutoTokenizer, GlmConfig, GlmForCausalLM

    hidden, layers, heads, kv_heads, inter = SIZES[size]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GlmConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = GlmForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _recipe_key(size: str, corpus: list[Path]) -> str:
    digest = hashlib.sha256(f"{BUILD_VERSION}:{size}".encode())
    for path in corpus:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def ensure_default_model(cache_dir: Path, size: str = "tiny", progress: bool = True) -> Path:
    """Return the embedded default model directory, building it once under cache_dir.

    A demo model trained by `make demo-model` (cache_dir/demo-model) wins when present.
    """
    demo = cache_dir / "demo-model"
    if (demo / "config.json").is_file():
        return demo
    corpus = local_corpus_files()
    target = cache_dir / f"default-model-{size}-{_recipe_key(size, corpus)}"
    if (target / "config.json").is_file():
        return target
    from tqdm import tqdm

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    steps = tqdm(total=2, desc="building the embedded default model", unit="step", disable=not progress)
    steps.set_postfix_str("training tokenizer")
    train_tokenizer(iter_jsonl_text(corpus), tmp / "tokenizer")
    steps.update()
    steps.set_postfix_str(f"initialising GLM ({size})")
    build_glm(tmp / "tokenizer", tmp, size=size)
    shutil.rmtree(tmp / "tokenizer")
    steps.update()
    steps.close()
    tmp.rename(target)
    return target
