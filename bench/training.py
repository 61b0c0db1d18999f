"""Training throughput on CPU: samples/s, tokens/s and peak RSS for LoRA (paper recipe) and full fine-tuning
of the small GLM; writes bench/results/training.json and compares with the paper's ~80,000 QA pairs/hour
(LoRA on ChatGLM-6B, one A100).

    python bench/training.py [--size tiny|small] [--steps 20] [--batch-size 4] [--max-len 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

PAPER_PAIRS_PER_HOUR = 80_000  # DoctorGLM: LoRA on ChatGLM-6B, one A100


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench(method: str, model_dir: Path, examples: list, args: argparse.Namespace) -> dict[str, float]:
    import torch

    from training.config import TrainConfig
    from training.features import collate, encode_all
    from training.trainer import load_for_training, make_optimizer

    cfg = TrainConfig(method=method, batch_size=args.batch_size, max_len=args.max_len,
                      optimizer="lion" if method == "lora" else "adamw", lr=2e-5 if method == "lora" else 1e-3)
    tokenizer, model, _ = load_for_training(model_dir, cfg)
    data = encode_all(tokenizer, examples, cfg.max_len, cfg.max_target)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    model.train()
    samples = tokens = 0
    start = 0.0
    for step in range(args.steps + 2):
        if step == 2:  # two warm-up steps left out of the timing
            start, samples, tokens = time.perf_counter(), 0, 0
        batch = collate([data[(step * cfg.batch_size + i) % len(data)] for i in range(cfg.batch_size)],
                        tokenizer.pad_token_id)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        samples += cfg.batch_size
        tokens += int(batch["attention_mask"].sum())
    secs = time.perf_counter() - start
    return {"samples_per_s": samples / secs, "tokens_per_s": tokens / secs, "pairs_per_hour": samples / secs * 3600,
            "s_per_step": secs / args.steps, "trainable_params": sum(p.numel() for p in params),
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=["micro", "tiny", "small"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="0: pick 1 or all cores by a quick measurement")
    args = parser.parse_args()

    from llm.tiny_model import build_glm, iter_jsonl_text, local_corpus_files, train_tokenizer
    from training.config import pick_threads
    from training.data import load_examples

    threads = pick_threads(args.threads)
    examples = load_examples(ROOT / "knowledge" / "data" / "sample_dialogues.jsonl")
    results: dict[str, object] = {"size": args.size, "batch_size": args.batch_size, "max_len": args.max_len,
                                  "steps": args.steps, "threads": threads, "cpu": platform.processor() or "cpu",
                                  "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(iter_jsonl_text(local_corpus_files()), Path(tmp) / "tok")
        model_dir = build_glm(Path(tmp) / "tok", Path(tmp) / "model", size=args.size)
        for method in ("lora", "full"):
            results[method] = bench(method, model_dir, examples, args)
            r = results[method]
            ratio = r["pairs_per_hour"] / PAPER_PAIRS_PER_HOUR
            print(f"{args.size} GLM, {method}: {r['samples_per_s']:.1f} samples/s, {r['tokens_per_s']:.0f} tokens/s, "
                  f"{r['pairs_per_hour']:,.0f} QA pairs/hour (paper: ~{PAPER_PAIRS_PER_HOUR:,}/hour, ChatGLM-6B "
                  f"LoRA on one A100; ratio {ratio:.2f}x), peak RSS {r['peak_rss_mb']:.0f} MB")
    results["paper_pairs_per_hour"] = PAPER_PAIRS_PER_HOUR
    out = ROOT / "bench" / "results" / "training.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"→ {out} (load average at start {results['load_avg_1m']:.1f} on {results['cores']} cores: a shared "
          "machine slows every number)")


if __name__ == "__main__":
    main()
