"""Quantisation benchmark (issue 15): INT8 / INT4 after the merge against the float model, one run.

    python bench/quantization.py [--train-steps 150] [--tokens 64]    # CPU: bench/results/quantization.json/.png
    python bench/quantization.py --models glm3-512x8-trained         # only that row; the others stay
    python bench/quantization.py gpu-check --device cuda [--small] [--out DIR]   # bench/gpu_check.sh runs this
    PYTHONPATH=/tmp/qlibs python bench/quantization.py libraries   # the candidate libraries, where importable

Models: the embedded default (random weights unless `make demo-model` ran) and a larger ChatGLM3-layout
GlmForCausalLM (hidden 512, 8 layers, 2 key/value groups, qkv bias, partial rotary 0.5), each with
random weights and briefly trained on dialogue text (random weights give near-flat logits, which makes
argmax agreement meaningless). Training is seeded and its weights are cached under .cache/bench keyed by
the starting weights, text and recipe, so reruns skip it; the larger model's row is skipped without
shared/data/dialogues. For each: weight bytes against fp32 and bf16, top-1 agreement of next-token logits
on held-out real Chinese dialogue text, greedy agreement over --tokens tokens, and decode tokens/s at batch
1 and 8 against the unquantised model, per wall second and per CPU second of the process (the CPU is
shared with other jobs; best of two interleaved rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from llm.quantize import METHODS, quantize_merged, weight_bytes  # noqa: E402
from llm.tiny_model import ensure_default_model, iter_jsonl_records, iter_jsonl_text, local_corpus_files  # noqa: E402

SHARED_DIALOGUES = Path(os.environ.get("DOCTORGLM_SHARED_DATA", ROOT.parent / "shared" / "data")) / "dialogues"
RESULTS = ROOT / "bench" / "results"
TARGETS = {"int8": {"smaller_vs_bf16": 1.9, "top1": 0.95}, "int4": {"smaller_vs_bf16": 3.5, "top1": 0.85}}


# ----- text -----


def dialogue_texts(limit: int = 4000) -> tuple[list[str], str]:
    """Chinese question + answer texts from ../shared/data/dialogues, else the project's sample dialogues."""
    files = sorted(SHARED_DIALOGUES.glob("*.jsonl")) if SHARED_DIALOGUES.is_dir() else []
    source = "shared/data/dialogues" if files else "knowledge/data (shared dialogues absent)"
    texts: list[str] = []
    for record in iter_jsonl_records(files or local_corpus_files()):
        text = "".join(str(record.get(k, "")) for k in ("question", "input", "answer", "output"))
        if len(text) >= 60:
            texts.append(text)
        if len(texts) >= limit:
            break
    if not texts:  # the sample library's own fields
        texts = [t for t in iter_jsonl_text(local_corpus_files()) if len(t) >= 60][:limit]
    return texts, source


def token_rows(tokenizer: Any, texts: list[str], length: int, rows: int, offset: int = 0) -> torch.Tensor:
    out: list[list[int]] = []
    for text in texts[offset:]:
        ids = tokenizer.encode(text)
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == rows:
            break
    return torch.tensor(out)


# ----- models -----


def float_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def glm3_layout(vocab: int, pad: int, eos: int, hidden: int = 512, layers: int = 8, heads: int = 8,
                kv_groups: int = 2, intermediate: int = 1664, seed: int = 0) -> Any:
    """ChatGLM3's layout as transformers' GlmForCausalLM (grouped key/values, partial rotary), random weights."""
    from transformers import GlmConfig, GlmForCausalLM

    config = GlmConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_groups,
                       head_dim=hidden // heads, max_position_embeddings=4096, pad_token_id=pad,
                       eos_token_id=eos, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return GlmForCausalLM(config).eval()


def brief_training(model: Any, tokenizer: Any, texts: list[str], steps: int, seq: int = 128,
                   batch: int = 8, lr: float = 2e-3, seed: int = 0) -> dict[str, float]:
    """Full-parameter AdamW on dialogue text, so that logits are peaked like a trained model's."""
    data = token_rows(tokenizer, texts, seq, steps * batch // 4 + batch, offset=200)
    torch.manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        rows = data[torch.randint(0, len(data), (batch,))]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step == 0 or (step + 1) % 25 == 0:
            print(f"  train step {step + 1}/{steps}: loss {losses[-1]:.2f}", flush=True)
    model.eval()
    return {"steps": steps, "seq": seq, "batch": batch, "lr": lr, "seed": seed, "loss_first": losses[0],
            "loss_last": sum(losses[-10:]) / min(10, len(losses)), "seconds": time.perf_counter() - started}


def _recipe_key(model: Any, texts: list[str], recipe: dict[str, Any]) -> str:
    """Hash of the starting weights, the config, the text and the recipe: any change retrains."""
    digest = hashlib.sha256(json.dumps([model.config.to_dict(), recipe], sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update("\n".join(texts).encode())
    return digest.hexdigest()[:16]


def trained_copy(model: Any, tokenizer: Any, texts: list[str], cache: Path, **recipe: Any) -> tuple[Any, dict]:
    """`model` after brief_training(**recipe), cached under .cache/bench so that reruns skip the training."""
    folder = cache / "bench" / f"quantization-trained-{_recipe_key(model, texts, recipe)}"
    record = folder / "training.json"
    if record.is_file():
        print(f"  trained weights cached in {folder.name}", flush=True)
        return float_model(folder), {**json.loads(record.read_text()), "cached": True}
    trained = copy.deepcopy(model)
    training = brief_training(trained, tokenizer, texts, **recipe)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    trained.save_pretrained(partial)
    (partial / "training.json").write_text(json.dumps(training) + "\n")
    os.replace(partial, folder)  # whole or absent: an interrupted run leaves no half-written cache
    return trained, {**training, "cached": False}


# ----- measurements -----


def top1_agreement(reference: Any, candidate: Any, rows: torch.Tensor) -> dict[str, float]:
    with torch.inference_mode():
        a = reference(input_ids=rows).logits.argmax(-1)
        b = candidate(input_ids=rows).logits.argmax(-1)
    return {"positions": int(a.numel()), "top1_agreement": float((a == b).float().mean())}


def greedy(model: Any, prompt: torch.Tensor, tokens: int) -> torch.Tensor:
    """Greedy continuation with a KV cache, no early stop (random models emit EOS at random)."""
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        produced = [nxt]
        for _ in range(tokens - 1):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            produced.append(nxt)
    return torch.cat(produced, dim=1)


def greedy_agreement(reference: Any, candidate: Any, prompts: torch.Tensor, tokens: int) -> dict[str, float]:
    a, b = greedy(reference, prompts, tokens), greedy(candidate, prompts, tokens)
    same = a == b
    first = [int(row.logical_not().nonzero()[0]) if not row.all() else tokens for row in same]
    return {"greedy_tokens": tokens, "greedy_agreement": float(same.float().mean()),
            "greedy_identical_prefix": sum(first) / len(first)}


def decode_rate(model: Any, prompt: torch.Tensor, tokens: int) -> tuple[float, float]:
    """Generated tokens (all rows) per wall second and per CPU second of this process, prefill included.

    On a CPU shared with other jobs the wall figure swings with their load; CPU seconds are what this
    process itself spent, so their ratios are the comparable ones.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    greedy(model, prompt, tokens)
    produced = prompt.shape[0] * tokens
    return produced / (time.perf_counter() - wall), produced / max(time.process_time() - cpu, 1e-9)


def speed_table(models: dict[str, Any], prompt: torch.Tensor, tokens: int, rounds: int = 2) -> dict[str, Any]:
    best: dict[str, dict[str, float]] = {name: {} for name in models}
    for model in models.values():  # warm-up
        decode_rate(model, prompt[:1, :8], 4)
    for _ in range(rounds):
        for batch in (1, 8):
            for name, model in models.items():
                for key, rate in zip((f"batch{batch}_tokens_per_s", f"batch{batch}_tokens_per_cpu_s"),
                                     decode_rate(model, prompt[:batch], tokens), strict=True):
                    best[name][key] = max(best[name].get(key, 0.0), rate)
    for name in models:
        for batch in (1, 8):
            for unit, label in (("s", "wall"), ("cpu_s", "cpu")):
                key = f"batch{batch}_tokens_per_{unit}"
                best[name][f"batch{batch}_{label}_vs_float"] = best[name][key] / best["float32"][key]
    return best


def measure(label: str, description: str, model: Any, tokenizer: Any, texts: list[str], tokens: int,
            speed_tokens: int) -> dict[str, Any]:
    print(f"{label}: {description}", flush=True)
    variants = {"float32": model, **{m: quantize_merged(copy.deepcopy(model), m) for m in METHODS}}
    fp32 = weight_bytes(model)
    rows = token_rows(tokenizer, texts, 64, 8)  # 8 x 64 = 512 positions of real text
    prompts = token_rows(tokenizer, texts, 24, 8, offset=50)
    result: dict[str, Any] = {"model": description, "parameters": sum(p.numel() for p in model.parameters()),
                              "fp32_bytes": fp32, "bf16_bytes": fp32 // 2, "methods": {}}
    speeds = speed_table(variants, prompts, speed_tokens)
    for name, variant in variants.items():
        row: dict[str, Any] = {"weight_bytes": weight_bytes(variant), **speeds[name]}
        row["smaller_vs_fp32"] = fp32 / row["weight_bytes"]
        row["smaller_vs_bf16"] = fp32 / 2 / row["weight_bytes"]
        if name != "float32":
            row.update(top1_agreement(model, variant, rows))
            row.update(greedy_agreement(model, variant, prompts[:4], tokens))
            target = TARGETS[name]
            row["meets_targets"] = bool(row["smaller_vs_bf16"] >= target["smaller_vs_bf16"]
                                        and row["top1_agreement"] >= target["top1"])
        result["methods"][name] = row
        print(f"  {name:7s} " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in row.items()), flush=True)
    return result


def chart(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = list(results["models"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("smaller_vs_bf16", "times smaller than bf16"), ("top1_agreement", "top-1 agreement"),
              ("batch8_cpu_vs_float", "batch-8 tokens per CPU-second vs fp32")]
    width = 0.38
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, method in enumerate(METHODS):
            values = [results["models"][m]["methods"][method].get(key, 0.0) for m in models]
            ax.bar([x + i * width for x in range(len(models))], values, width, label=method)
        ax.set_xticks([x + width / 2 for x in range(len(models))], models, fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Quantisation after the merge, {results['device']} ({results['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


MODELS = ("default", "default-trained", "glm3-512x8", "glm3-512x8-trained")
LARGER = "ChatGLM3 layout as GlmForCausalLM: hidden 512, 8 layers, 8 heads, 2 kv groups, MLP 1664, qkv bias, " \
    "partial rotary 0.5"


def cpu_bench(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    cache = ROOT / ".cache"
    default_dir = ensure_default_model(cache, progress=False)
    texts, source = dialogue_texts()
    default = float_model(default_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_dir)
    out = Path(args.out)
    selected = args.models or list(MODELS)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "device": f"cpu ({os.cpu_count()} cores, shared)",
        "torch": torch.__version__, "python": platform.python_version(), "text": source,
        "command": "python bench/quantization.py " + " ".join(sys.argv[1:]), "models": {}}
    if args.models and out.is_file():  # a partial run replaces its rows and keeps the others
        previous = json.loads(out.read_text(encoding="utf-8"))
        results["models"] = previous.get("models", {})
        results["rows_from_earlier_runs"] = {name: previous.get("date") for name in results["models"]
                                             if name not in selected}

    def row(name: str, description: str, model: Any, training: dict[str, Any] | None = None) -> None:
        results["models"][name] = measure(name, description, model, tokenizer, texts, args.tokens,
                                          args.speed_tokens)
        if training is not None:
            results["models"][name]["training"] = training

    trained_from = "demo-model (trained)" if default_dir.name == "demo-model" else "random weights"
    if "default" in selected:
        row("default", f"embedded default {default_dir.name} (GLM hidden 256, 4 layers, {trained_from})", default)
    if "default-trained" in selected:
        trained, training = trained_copy(default, tokenizer, texts, cache, steps=args.train_steps)
        row("default-trained", f"the default after {training['steps']} AdamW steps on {source} "
            f"(loss {training['loss_first']:.2f} -> {training['loss_last']:.2f})", trained, training)
        del trained
    larger = glm3_layout(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    if "glm3-512x8" in selected:
        row("glm3-512x8", f"{LARGER}, random weights", larger)
    if "glm3-512x8-trained" in selected:
        if source != "shared/data/dialogues":  # the sample dialogues are too few to train on honestly
            print("glm3-512x8-trained: skipped, shared/data/dialogues is absent", flush=True)
            results["models"].pop("glm3-512x8-trained", None)
        else:
            trained, training = trained_copy(larger, tokenizer, texts, cache, steps=args.larger_train_steps,
                                             seq=args.larger_train_seq)
            row("glm3-512x8-trained", f"{LARGER}, after {training['steps']} AdamW steps of {training['batch']} x "
                f"{training['seq']} tokens on {source} (loss {training['loss_first']:.2f} -> "
                f"{training['loss_last']:.2f})", trained, training)
    results["models"] = {name: results["models"][name] for name in MODELS if name in results["models"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    chart(results, out.with_suffix(".png"))
    print(f"wrote {out}")


# ----- the candidate libraries (why llm/quantize.py is our own; docs/engine.md) -----


def _library_variant(name: str, model: Any) -> Any:
    """The default model quantised by one candidate library, the way its documentation says."""
    if name.startswith("bitsandbytes"):
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = (BitsAndBytesConfig(load_in_8bit=True) if name.endswith("int8") else
                  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_compute_dtype=torch.float32))
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=config, device_map="cpu",
                                                        dtype=torch.float32)
    model = copy.deepcopy(model)
    if name.startswith("torchao"):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig() if name.endswith("int8") else Int4WeightOnlyConfig(group_size=32))
    elif name.startswith("quanto"):
        from optimum.quanto import freeze, qint4, qint8, quantize

        quantize(model, weights=qint8 if name.endswith("int8") else qint4)
        freeze(model)
    elif name.startswith("hqq"):
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=8 if name.endswith("int8") else 4,
                                      group_size=64), compute_dtype=torch.float32, device="cpu")
    else:
        model = quantize_merged(model, name.rsplit("-", 1)[1])
    return model


def libraries(args: argparse.Namespace) -> None:
    """Each candidate on the default model, fp32 CPU, under torch.inference_mode as the engine runs it."""
    default_dir = ensure_default_model(ROOT / ".cache", progress=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_dir)
    texts, _ = dialogue_texts()
    model = float_model(default_dir)
    rows = token_rows(tokenizer, texts, 64, 8)
    prompt = token_rows(tokenizer, texts, 16, 8, offset=50)
    report: dict[str, Any] = {"model": default_dir.name, "device": "cpu", "torch": torch.__version__, "rows": {}}
    decode_rate(model, prompt[:1], 4)  # warm-up
    for name in [f"{lib}-{m}" for lib in ("llm.quantize", "bitsandbytes", "torchao", "quanto", "hqq") for m in METHODS]:
        try:
            variant = _library_variant(name, model)
            with torch.inference_mode():
                row = {"weight_bytes": weight_bytes(variant), **top1_agreement(model, variant, rows)}
                decode_rate(variant, prompt[:1], 4)  # warm-up
                for b in (1, 8):  # per CPU second, best of two, alternating with the float model
                    pairs = [(decode_rate(model, prompt[:b], 16)[1], decode_rate(variant, prompt[:b], 16)[1])
                             for _ in range(2)]
                    row[f"batch{b}_cpu_vs_fp32"] = max(v for _, v in pairs) / max(f for f, _ in pairs)
        except Exception as exc:  # noqa: BLE001 - a failure is the finding
            row = {"failed": f"{type(exc).__name__}: {str(exc)[:160]}"}
        report["rows"][name] = row
        print(name, json.dumps(row), flush=True)
    (RESULTS / "quantization_libraries.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


# ----- the GPU check (bench/gpu_check.sh) -----


async def _stream_all(engine: Any, prompts: list[str], tokens: int) -> tuple[float, list[float], int]:
    from service.engine.types import GenerationRequest, SamplingParams, TokenDelta

    params = SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0)
    started = time.perf_counter()

    async def one(message: str) -> tuple[float, int]:
        first, count = None, 0
        async for event in engine.stream(GenerationRequest(message=message, history=[], params=params)):
            if isinstance(event, TokenDelta):
                first = first if first is not None else time.perf_counter() - started
            else:
                count = event.completion_tokens
        return first or 0.0, count

    done = await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - started, [d[0] for d in done], sum(d[1] for d in done)


def engine_stream(loaded: Any, batch: int, tokens: int) -> dict[str, float]:
    """Stream `batch` concurrent requests through the real LocalEngine: tokens/s, TTFT."""
    from service.engine.local import LocalEngine

    # No repetition guard: random weights loop, and every request must produce `tokens` tokens.
    engine = LocalEngine(loaded, max_batch_size=max(batch, 1), context_tokens=tokens + 256,
                         repetition_guard=False)
    engine.start()
    try:
        asyncio.run(_stream_all(engine, ["头痛"], 4))  # warm-up
        questions = ["孩子发烧三天，咳嗽有痰，怎么办？", "头痛恶心两天", "胃痛，饭后加重", "膝盖肿痛，走路困难",
                     "失眠多梦一个月", "皮肤起红疹，很痒", "血压高，头晕", "咳嗽两周，夜里加重"]
        wall, ttfts, produced = asyncio.run(_stream_all(engine, (questions * 2)[:batch], tokens))
    finally:
        engine.stop()
    return {"batched_path": engine.batched, "tokens_per_s": produced / wall, "ttft_s_max": max(ttfts),
            "ttft_s_mean": sum(ttfts) / len(ttfts), "completion_tokens": produced, "wall_s": wall}


def mid_size_glm(tokenizer_dir: Path, out_dir: Path, small: bool) -> dict[str, Any]:
    """A random GLM in ChatGLM3's proportions (1.1B parameters; --small: a few million) plus a LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    size = dict(hidden=256, layers=2, heads=4, kv_groups=2, intermediate=768) if small else \
        dict(hidden=2048, layers=24, heads=16, kv_groups=2, intermediate=5632)
    model = glm3_layout(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, **size).to(torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    torch.manual_seed(1)
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    lora.save_pretrained(out_dir / "adapter")
    base = lora.unload()  # the adapter stays separate: the service merges it at load
    base.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    return {"parameters": parameters, **size}


def convert_fixture(cache: Path, device: str) -> dict[str, Any]:
    """Convert an original-layout ChatGLM3 fixture through the service's loader, when both are here."""
    fixture = SHARED_DIALOGUES.parent.parent / "models" / "chatglm" / "chatglm3-6b"
    try:
        import llm.convert  # noqa: F401
    except ImportError:
        return {"skipped": "llm.convert is not in this tree"}
    if not (fixture / "config.json").is_file():
        return {"skipped": f"no original-layout fixture at {fixture}"}
    from llm.loading import load_model

    started = time.perf_counter()
    loaded = load_model(fixture, device=device, quantization="int4", cache_dir=cache)
    rate = engine_stream(loaded, 1, 16)
    return {"fixture": fixture.name, "seconds": time.perf_counter() - started,
            "int4_tokens_per_s": rate["tokens_per_s"]}


def gpu_check(args: argparse.Namespace) -> None:
    import transformers

    from llm.loading import load_model

    device = args.device
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    out_dir = Path(args.out or os.environ.get("OUT") or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "python": platform.python_version(), "small": args.small, "tokens": args.tokens, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report["convert"] = convert_fixture(work / "cache", device)
        print("convert:", report["convert"], flush=True)
        default_dir = ensure_default_model(work / "cache", progress=False)
        t0 = time.perf_counter()
        report["model"] = mid_size_glm(default_dir, work, args.small)
        report["model"]["build_s"] = time.perf_counter() - t0
        print("model:", report["model"], flush=True)
        dtype = "bf16" if cuda else "fp32"
        for mode in ("none", *METHODS):
            gc.collect()  # the previous mode's model and engine
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loaded = load_model(work / "model", adapter_dir=work / "adapter", dtype=dtype, device=device,
                                quantization=mode)
            row: dict[str, Any] = {"load_merge_quantise_s": time.perf_counter() - t0,
                                   "weight_bytes": weight_bytes(loaded.model)}
            for batch in (1, 8):
                row[f"batch{batch}"] = engine_stream(loaded, batch, args.tokens)
            if cuda:
                row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
            report["modes"][dtype if mode == "none" else mode] = row
            print(mode, json.dumps(row), flush=True)
            del loaded
    report["seconds"] = time.perf_counter() - started
    path = out_dir / ("gpu_check.json" if cuda else "gpu_check_cpu.json")
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {path} in {report['seconds']:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--train-steps", type=int, default=150, help="AdamW steps for default-trained")
    parser.add_argument("--larger-train-steps", type=int, default=60, help="AdamW steps for glm3-512x8-trained")
    parser.add_argument("--larger-train-seq", type=int, default=64, help="its sequence length (batch 8)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=None,
                        help="only these rows; the others are kept from --out")
    parser.add_argument("--tokens", type=int, default=64, help="greedy agreement length")
    parser.add_argument("--speed-tokens", type=int, default=32, help="decoded tokens per speed measurement")
    parser.add_argument("--out", default=str(RESULTS / "quantization.json"))
    check = sub.add_parser("gpu-check", help="the mid-size GLM on one device: bf16 / int8 / int4 through the engine")
    check.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    check.add_argument("--small", action="store_true", help="a few-million-parameter model (CPU test of the logic)")
    check.add_argument("--tokens", type=int, default=128)
    check.add_argument("--out", default=None, help="a folder (default $OUT, else bench/results)")
    sub.add_parser("libraries", help="bitsandbytes, torchao, optimum-quanto, hqq and llm.quantize on the default")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    if args.command == "gpu-check":
        gpu_check(args)
    elif args.command == "libraries":
        libraries(args)
    else:
        cpu_bench(args)


if __name__ == "__main__":
    main()
