"""`make demo-model`: a doctor-like tiny default model in under 10 minutes on 2 CPU cores.

A randomly initialised model cannot learn a language through LoRA r=8 alone (a rank-8 update of q and v
leaves the embeddings, MLPs and output head random), so the demo runs in two stages:

1. demo pretrain — full training of the tiny GLM (llm/tiny_model.py, ~6.6M params) on all dialogues,
   plain prompts, AdamW with cosine decay over a time budget. This stands in for ChatGLM-6B's pretraining.
2. the paper's LoRA recipe on top (r=8, alpha=16, dropout 0.1, q_proj+v_proj, Lion, batch 4, max_len 512,
   max_target 100) on the doctor dialogues, half the prompts carrying the prompt designer's disease brief so
   the model learns the prompt the service sends. Learning rate 1e-4 instead of 2e-5: a few hundred steps on a
   6.6M model, not 1 epoch on a 6B one. Then merge into $DOCTORGLM_CACHE_DIR/demo-model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from .config import TrainConfig
from .data import Example, prepare

log = logging.getLogger(__name__)

SAMPLE_QUESTIONS = [
    "医生，我最近老是咳嗽，晚上更厉害，需要吃什么药吗？",
    "胃经常反酸烧心，吃完饭躺下更明显，是怎么回事？",
    "血压160/100，头有点晕，需要马上去医院吗？",
]
DOCTOR_FILES = ("cmd_im.jsonl", "medicalgpt_sft_1k.jsonl")  # real doctor-style answers: the LoRA stage


def repo_root() -> Path:
    from llm.paths import REPO_ROOT

    return REPO_ROOT


def shared_dialogues() -> Path | None:
    base = Path(os.environ.get("DOCTORGLM_SHARED_DATA") or repo_root().parent / "shared" / "data")
    folder = base / "dialogues"
    return folder if any(folder.glob("*.jsonl")) else None


def build_base(model_dir: Path, text_files: list[Path]) -> Path:
    """Tokenizer (vocab 4,096: half the output-layer cost of 8,192, so more steps fit the budget) on the
    project text + the dialogues, then the tiny GLM, randomly initialised."""
    from llm.tiny_model import build_glm, iter_jsonl_text, local_corpus_files, train_tokenizer

    files = local_corpus_files() + [p for p in text_files if p not in local_corpus_files()]
    train_tokenizer(iter_jsonl_text(files), model_dir / "tokenizer", vocab_size=4096)
    build_glm(model_dir / "tokenizer", model_dir, size="tiny", max_positions=2048)
    shutil.rmtree(model_dir / "tokenizer")
    return model_dir


def sample_answers(model_dir: Path, questions: list[str], with_brief: bool = False) -> dict[str, str]:
    """Greedy answers with a light repetition penalty (close to what the service does by default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm.chat_format import render
    from llm.paths import cache_dir
    from llm.prompt import compose_message

    from .features import brief_provider

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    brief = brief_provider(None, cache_dir()) if with_brief else None
    out = {}
    for q in questions:
        ids = torch.tensor([render(tokenizer, [], compose_message(q, brief(q) if brief else ""))])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=100,
                                 do_sample=False, repetition_penalty=1.15, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        out[q] = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return out


def run_demo(budget_s: float = 540, data_dir: Path | None = None, out_dir: Path | None = None,
             run_dir: Path | None = None) -> dict[str, object]:

    from llm.paths import cache_dir

    from .merge import merge
    from .trainer import Trainer

    started = time.perf_counter()
    root = repo_root()
    out_dir = out_dir or cache_dir() / "demo-model"
    run_dir = run_dir or root / "artifacts" / "demo-model"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    data_dir = data_dir or shared_dialogues()
    own = root / "knowledge" / "data" / "sample_dialogues.jsonl"
    files = sorted(data_dir.glob("*.jsonl")) + [own] if data_dir else [own]
    print(f"[demo] data: {', '.join(p.name for p in files)}")

    everything = prepare(files, val_fraction=0.03, max_answer_chars=600, max_question_chars=400)
    for report in everything.reports:
        print(f"[demo]   {report.summary()}")
    doctor_names = {Path(n).stem for n in DOCTOR_FILES} | {own.stem}
    doctor = [e for e in everything.train if e.source in doctor_names] or everything.train
    doctor_val = [e for e in everything.val if e.source in doctor_names] or everything.val
    print(f"[demo] {len(everything.train)} train / {len(everything.val)} val pairs; "
          f"doctor dialogues for LoRA: {len(doctor)} / {len(doctor_val)}")

    base = build_base(run_dir / "base-random", files)
    print(f"[demo] tokenizer + random tiny GLM built in {time.perf_counter() - started:.0f}s")

    left = budget_s - (time.perf_counter() - started)
    # Evaluations count against the time budget: keep them small (64 val examples, 32-token probe answers).
    pre_cfg = TrainConfig(method="full", optimizer="adamw", lr=2e-3, batch_size=16, epochs=3, warmup_steps=20,
                          lr_schedule="cosine", max_len=160, max_target=112, weight_decay=0.01,
                          max_seconds=left * 0.7, eval_every=100, stop_on_collapse=False,
                          max_val_examples=64, probe_max_new_tokens=32, seed=0)
    pre = Trainer(pre_cfg, base, run_dir / "pretrain").run(everything.train, everything.val)
    print(f"[demo] pretrain: {pre.steps} steps in {pre.seconds:.0f}s, best val loss {pre.best_val_loss:.3f}")

    left = budget_s - (time.perf_counter() - started)
    lora_cfg = TrainConfig(lr=1e-4, max_seconds=max(30.0, left - 60), epochs=1, eval_every=40,
                           with_brief=0.5, max_val_examples=64, probe_max_new_tokens=32, seed=1)
    lora = Trainer(lora_cfg, pre.best_dir or base, run_dir / "lora").run(doctor, doctor_val)
    print(f"[demo] LoRA: {lora.steps} steps in {lora.seconds:.0f}s, best val loss {lora.best_val_loss:.3f} "
          f"({lora.stopped})")

    merged = merge(lora.best_dir, out_dir) if lora.best_dir else None
    samples = sample_answers(merged or pre.best_dir, SAMPLE_QUESTIONS)
    summary: dict[str, object] = {
        "seconds": round(time.perf_counter() - started, 1),
        "model_dir": str(merged),
        "pretrain": {"steps": pre.steps, "seconds": round(pre.seconds, 1), "best_val_loss": pre.best_val_loss,
                     "samples_per_s": round(pre.samples_per_s, 1), "first": pre.history[0], "last": pre.history[-1]},
        "lora": {"steps": lora.steps, "seconds": round(lora.seconds, 1), "best_val_loss": lora.best_val_loss,
                 "stopped": lora.stopped, "samples_per_s": round(lora.samples_per_s, 1),
                 "first": lora.history[0], "last": lora.history[-1]},
        "probe_before": _probe_numbers(pre.probes[0]),
        "probe_after_pretrain": _probe_numbers(pre.probes[-1]),
        "probe_after_lora": _probe_numbers(lora.probes[-1]),
        "samples": samples,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2, default=str),
                                          encoding="utf-8")
    shutil.rmtree(base, ignore_errors=True)
    print(f"[demo] done in {summary['seconds']}s → {merged}; curves: {run_dir}/pretrain/curves.png, "
          f"{run_dir}/lora/curves.png; summary: {run_dir}/summary.json")
    for q, a in samples.items():
        print(f"[demo] 问：{q}\n[demo] 答：{a}")
    return summary


def _probe_numbers(probe: dict[str, object]) -> dict[str, object]:
    return {k: probe[k] for k in ("step", "distinct_1", "distinct_2", "repeat_4gram", "empty_rate", "general_loss",
                                  "medical_loss", "degenerate", "collapsed")}


__all__ = ["run_demo", "Example"]
