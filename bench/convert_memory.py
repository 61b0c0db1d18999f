"""Peak memory of converting an original ChatGLM2-layout checkpoint, against its largest shard.

Builds a synthetic checkpoint laid out as THUDM publishes ChatGLM2-6B (config.json, 3 `pytorch_model-*.bin`
shards written with torch.save + pytorch_model.bin.index.json, fp16, random weights; hidden 1024, 8 layers
by default), converts it in a fresh subprocess and reads that process's RSS after its imports (the
baseline) and its peak RSS during the conversion (Linux /proc: VmRSS, and VmHWM reset by clear_refs). The
converter holds one input shard at a time, so the peak should sit near baseline + the largest shard, not
baseline + the whole checkpoint.

    .venv/bin/python bench/convert_memory.py            # writes bench/results/convert_memory.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE = REPO_ROOT.parent / "shared" / "models" / "chatglm" / "chatglm2-6b"
MIB = 1024**2


def original_config(hidden: int, layers: int, heads: int, groups: int, ffn: int, vocab: int) -> dict:
    return {
        "_name_or_path": "synthetic/chatglm2-layout", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "ffn_hidden_size": ffn, "hidden_size": hidden,
        "kv_channels": hidden // heads, "layernorm_epsilon": 1e-5, "multi_query_attention": True,
        "multi_query_group_num": groups, "num_attention_heads": heads, "num_layers": layers,
        "padded_vocab_size": vocab, "post_layer_norm": True, "rmsnorm": True, "seq_length": 2048,
        "torch_dtype": "float16", "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0,
    }


def layer_tensors(i: int, config: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    hidden, ffn = config["hidden_size"], config["ffn_hidden_size"]
    qkv = hidden + 2 * config["multi_query_group_num"] * config["kv_channels"]
    prefix = f"transformer.encoder.layers.{i}."

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).half()

    return {
        prefix + "input_layernorm.weight": torch.ones(hidden, dtype=torch.half),
        prefix + "self_attention.query_key_value.weight": rand(qkv, hidden),
        prefix + "self_attention.query_key_value.bias": rand(qkv),
        prefix + "self_attention.dense.weight": rand(hidden, hidden),
        prefix + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.half),
        prefix + "mlp.dense_h_to_4h.weight": rand(2 * ffn, hidden),
        prefix + "mlp.dense_4h_to_h.weight": rand(hidden, ffn),
    }


def build_checkpoint(out: Path, hidden: int, layers: int, shards: int, vocab: int) -> dict:
    """Write the synthetic original-layout checkpoint; returns its shard sizes."""
    out.mkdir(parents=True)
    config = original_config(hidden, layers, heads=16, groups=2, ffn=hidden * 11 // 4, vocab=vocab)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(FIXTURE / name, out / name)
    gen = torch.Generator().manual_seed(0)
    # Embedding with the first layers, output layer with the last: roughly even shards.
    groups = [list(range(layers))[s::shards] for s in range(shards)]
    groups = [sorted(g) for g in groups]
    weight_map: dict[str, str] = {}
    sizes = []
    for s, layer_ids in enumerate(groups, start=1):
        state: dict[str, torch.Tensor] = {}
        if s == 1:
            state["transformer.embedding.word_embeddings.weight"] = (torch.randn(vocab, hidden, generator=gen)
                                                                     * 0.02).half()
            state["transformer.rotary_pos_emb.inv_freq"] = torch.ones(config["kv_channels"] // 4)
        for i in layer_ids:
            state.update(layer_tensors(i, config, gen))
        if s == shards:
            state["transformer.encoder.final_layernorm.weight"] = torch.ones(hidden, dtype=torch.half)
            state["transformer.output_layer.weight"] = (torch.randn(vocab, hidden, generator=gen) * 0.02).half()
        name = f"pytorch_model-{s:05d}-of-{shards:05d}.bin"
        torch.save(state, out / name)
        sizes.append((out / name).stat().st_size)
        weight_map.update(dict.fromkeys(state, name))
        del state
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return {"shard_bytes": sizes}


# Runs in a fresh interpreter: import everything the conversion needs, reset the kernel's peak-RSS mark
# (VmHWM) to the current RSS, convert, read the mark.
CHILD = """
import json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from transformers import GlmConfig, PreTrainedTokenizerFast  # noqa: F401
import sentencepiece, safetensors.torch  # noqa: F401
from llm.convert import convert
import llm.convert.tokenizer  # noqa: F401

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

open("/proc/self/clear_refs", "w").write("5")
baseline = status("VmRSS")
result = convert(Path({source!r}), Path({out!r}), progress=False)
print(json.dumps({{"baseline_kib": baseline, "peak_kib": status("VmHWM"), "seconds": result.seconds,
                  "shards": result.shards}}))
"""


def measure(source: Path, out: Path) -> dict:
    code = CHILD.format(root=str(REPO_ROOT), source=str(source), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "convert_memory.json")
    args = parser.parse_args()
    if not (FIXTURE / "tokenizer.model").is_file():
        print(f"needs the ChatGLM2 fixture's tokenizer at {FIXTURE}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="convert-memory-") as tmp:
        source = Path(tmp) / "original"
        built = build_checkpoint(source, args.hidden, args.layers, args.shards, args.vocab)
        run = measure(source, Path(tmp) / "converted")
        converted_bytes = sum(p.stat().st_size for p in (Path(tmp) / "converted").glob("*.safetensors"))
    largest, total = max(built["shard_bytes"]), sum(built["shard_bytes"])
    baseline, peak = run["baseline_kib"] * 1024, run["peak_kib"] * 1024
    result = {
        "checkpoint": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "dtype": "float16",
                       "shards": args.shards, "shard_mib": [round(b / MIB, 1) for b in built["shard_bytes"]],
                       "total_mib": round(total / MIB, 1)},
        "converted_mib": round(converted_bytes / MIB, 1), "output_shards": run["shards"],
        "baseline_rss_mib": round(baseline / MIB, 1), "peak_rss_mib": round(peak / MIB, 1),
        "peak_above_baseline_mib": round((peak - baseline) / MIB, 1),
        "largest_shard_mib": round(largest / MIB, 1),
        "peak_above_baseline_per_largest_shard": round((peak - baseline) / largest, 2),
        "peak_above_baseline_per_checkpoint": round((peak - baseline) / total, 2),
        "seconds": round(run["seconds"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"checkpoint {result['checkpoint']['total_mib']} MiB in {args.shards} shards "
          f"(largest {result['largest_shard_mib']} MiB); conversion peak RSS {result['peak_rss_mib']} MiB = "
          f"baseline {result['baseline_rss_mib']} + {result['peak_above_baseline_mib']} MiB "
          f"({result['peak_above_baseline_per_largest_shard']}x the largest shard, "
          f"{result['peak_above_baseline_per_checkpoint']}x the checkpoint) in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
