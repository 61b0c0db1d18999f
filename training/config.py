"""Training settings: one dataclass whose defaults are the DoctorGLM paper's recipe.

Paper (DoctorGLM, ChatGLM-6B): LoRA on q and v, rank 8, alpha 16, Lion at lr 2e-5, batch 4, 1 epoch,
max sequence 512, max target 100, no warmup, no weight decay. The paper does not state LoRA dropout;
0.1 is what the ChatGLM-Tuning code it derives from uses, so that is the default here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

Method = Literal["lora", "ptuning", "full"]



@dataclass
class TrainConfig:
    method: Method = "lora"
    # LoRA (paper)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: list[str] | None = None  # None: the model family's targets (llm/families.py)
    # P-tuning v2 (peft PrefixTuning); 128 virtual tokens is ChatGLM-6B's ptuning default
    pre_seq_len: int = 128
    # optimisation (paper)
    optimizer: Literal["lion", "adamw"] = "lion"
    lr: float = 2e-5
    batch_size: int = 4
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = 0  # >0 caps the run (takes precedence over epochs)
    max_seconds: float = 0.0  # >0 stops (and keeps the best) after this wall-clock time
    warmup_steps: int = 0
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    max_grad_norm: float = 1.0  # the HF Trainer default the original code ran with
    max_len: int = 512
    max_target: int = 100
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp32 on CPU, bf16 (else fp16) on GPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 42
    threads: int = 0  # CPU threads; 0 = measure 1 vs all cores at start and take the faster (see pick_threads)
    # prompts
    with_brief: float = 0.0  # fraction of examples whose prompt carries the prompt designer's disease brief
    brief_chars: int = 600
    knowledge_path: str | None = None  # library for --with-brief (default: the service's default library)
    # evaluation, probe, stopping
    eval_every: int = 50  # validation loss + collapse probe every N optimizer steps (and at step 0 and the end)
    probe_max_new_tokens: int = 48
    max_val_examples: int = 200
    stop_on_collapse: bool = True  # False: record collapse in the metrics but keep training (demo pretrain)
    collapse_patience: int = 1  # consecutive collapsed probes before stopping
    general_loss_delta: float = 1.0  # nats above the run's best general-reference loss that count as collapse
    early_stop_patience: int = 0  # >0: stop after this many evals without a val-loss improvement
    log_every: int = 10
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), ensure_ascii=False, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def pick_threads(requested: int = 0) -> int:
    """Set torch's CPU threads. On a shared machine, OpenMP threads that get preempted spin at barriers and
    2 threads ran a forward pass 12x slower than 1 (measured under load ~6 on 2 cores); unloaded, 2 threads
    are ~1.8x faster. So 0 means: time a small matmul both ways now and keep the faster."""
    import os
    import time

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > 0 or cores == 1:
        torch.set_num_threads(requested or 1)
        return torch.get_num_threads()
    a = torch.randn(384, 384)
    timings = {}
    for n in (1, cores):
        torch.set_num_threads(n)
        start = time.perf_counter()
        for _ in range(30):
            a @ a
        timings[n] = time.perf_counter() - start
    best = min(timings, key=timings.__getitem__)
    torch.set_num_threads(best)
    return best
