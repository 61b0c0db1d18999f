"""A plain torch training loop: LoRA / prefix / full fine-tuning, eval + collapse probe, keep-best, resume.

Checkpoints: <run>/checkpoint-last (weights + trainer_state.pt: optimizer, scheduler, step, RNG, history) is
rewritten at every evaluation; <run>/best holds the weights with the lowest validation loss among evaluations
whose probe did not flag collapse. A collapse stops the run; best/ is what merge and the service use.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llm.loading import resolve_device, resolve_dtype
from llm.paths import cache_dir

from .config import TrainConfig, pick_threads
from .data import Example
from .features import Encoded, brief_provider, collate, encode_all
from .probe import CollapseWatch, run_probe

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    best_dir: Path | None
    steps: int
    stopped: str  # "completed", "collapse", "time", "patience"
    best_val_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_s: float = 0.0
    tokens_per_s: float = 0.0


def load_for_training(model_dir: Path, cfg: TrainConfig) -> tuple[Any, Any, str]:
    """Tokenizer + model (+ peft wrapper) on the device; base weights in bf16/fp16 on GPU for LoRA/prefix."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llm.chatglm6b  # noqa: F401  (registers the project's ChatGLM-6B class for converted directories)

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    # Full fine-tuning keeps fp32 master weights and runs under autocast; adapters train in fp32 anyway.
    load_dtype = torch.float32 if cfg.method == "full" else dtype
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=load_dtype)
    if cfg.method == "lora":
        from .lora import apply_lora

        model = apply_lora(model, cfg)
    elif cfg.method == "ptuning":
        from .ptuning import apply_prefix_tuning

        model = apply_prefix_tuning(model, cfg)
    return tokenizer, model.to(device), device


def make_optimizer(params: list[Any], cfg: TrainConfig) -> Any:
    import torch

    if cfg.optimizer == "lion":
        from lion_pytorch import Lion

        return Lion(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, cfg: TrainConfig, time_progress: float = 0.0) -> float:
    """Warmup, then constant / linear / cosine decay over the steps or the time budget, whichever ends first."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = max((step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps), time_progress)
    if cfg.lr_schedule == "linear":
        return max(0.0, 1 - progress)
    if cfg.lr_schedule == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # floor at 10%
    return 1.0


def evaluate(model: Any, data: list[Encoded], pad_id: int, batch_size: int = 8) -> float:
    """Token-weighted mean loss over the answer tokens of the validation examples."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            batch = {k: v.to(device) for k, v in collate(data[i:i + batch_size], pad_id).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    model.train(was_training)
    return total / max(1, count)


def save_weights(model: Any, tokenizer: Any, path: Path, cfg: TrainConfig) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    cfg.save(tmp / "train_config.json")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # a crash mid-save never leaves a half-written checkpoint under the real name


def load_weights(model: Any, path: Path, cfg: TrainConfig) -> None:
    from safetensors.torch import load_file

    if cfg.method == "full":
        state = {}
        for shard in sorted(path.glob("*.safetensors")):
            state.update(load_file(shard))
        model.load_state_dict(state, strict=False)
    else:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))


class Trainer:
    def __init__(self, cfg: TrainConfig, model_dir: Path, run_dir: Path, progress: bool = True) -> None:
        self.cfg, self.model_dir, self.run_dir, self.progress = cfg, Path(model_dir), Path(run_dir), progress

    def run(self, train: list[Example], val: list[Example], resume: bool = False) -> TrainResult:
        import torch
        from tqdm import tqdm

        cfg, run_dir = self.cfg, self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if resolve_device(cfg.device) == "cpu":
            log.info("CPU threads: %d", pick_threads(cfg.threads))
        tokenizer, model, device = load_for_training(self.model_dir, cfg)
        pad_id = tokenizer.pad_token_id
        brief = (brief_provider(Path(cfg.knowledge_path) if cfg.knowledge_path else None, cache_dir(),
                                cfg.brief_chars) if cfg.with_brief > 0 else None)
        train_enc = encode_all(tokenizer, train, cfg.max_len, cfg.max_target, cfg.with_brief, brief, cfg.seed,
                               self.progress)
        val_enc = encode_all(tokenizer, val[: cfg.max_val_examples], cfg.max_len, cfg.max_target, cfg.with_brief,
                             brief, cfg.seed + 1)
        if not train_enc:
            raise ValueError("no training examples")
        per_step = cfg.batch_size * cfg.grad_accum
        steps_per_epoch = max(1, len(train_enc) // per_step)
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, cfg)
        clock = {"start": time.perf_counter(), "before": 0.0}  # seconds of earlier (resumed) sessions in "before"

        def time_progress() -> float:
            if not cfg.max_seconds:
                return 0.0
            return (clock["before"] + time.perf_counter() - clock["start"]) / cfg.max_seconds

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg, time_progress()))
        amp_dtype = resolve_dtype(cfg.dtype, device)
        use_amp = device == "cuda" and amp_dtype != torch.float32
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
        watch = CollapseWatch(delta=cfg.general_loss_delta, patience=cfg.collapse_patience,
                              healthy_below=math.log(len(tokenizer)) - 1)
        state: dict[str, Any] = {"step": 0, "history": [], "probes": [], "best_val": float("inf"), "bad_evals": 0,
                                 "seconds": 0.0, "samples": 0, "tokens": 0}
        last = run_dir / "checkpoint-last"
        if resume and (last / "trainer_state.pt").is_file():
            saved = torch.load(last / "trainer_state.pt", weights_only=False)
            load_weights(model, last, cfg)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            state = saved["state"]
            watch = CollapseWatch(**saved["watch"])
            random.setstate(saved["py_rng"])
            torch.set_rng_state(saved["torch_rng"])
            log.info("resumed from %s at step %d", last, state["step"])
        trainable = sum(p.numel() for p in params)
        log.info("%s: %d trainable params, %d train / %d val examples, %d steps", cfg.method, trainable,
                 len(train_enc), len(val_enc), total)

        def order(epoch: int) -> list[int]:
            idx = list(range(len(train_enc)))
            random.Random(cfg.seed + epoch).shuffle(idx)  # seeded per epoch: resume sees the same order
            return idx

        def checkpoint(stopped: str = "") -> None:
            save_weights(model, tokenizer, last, cfg)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state,
                        "watch": asdict(watch), "py_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
                        "stopped": stopped}, last / "trainer_state.pt")

        def evaluation(step: int, train_loss: float | None) -> str:
            """Eval + probe; returns a stop reason or ''."""
            row: dict[str, Any] = {"step": step, "lr": scheduler.get_last_lr()[0], "train_loss": train_loss,
                                   "val_loss": evaluate(model, val_enc, pad_id) if val_enc else float("nan")}
            probe = run_probe(model, tokenizer, step, cfg.probe_max_new_tokens)
            collapsed = watch.update(probe)
            row.update({k: getattr(probe, k) for k in ("general_loss", "medical_loss", "distinct_2", "repeat_4gram",
                                                       "empty_rate", "degenerate", "collapsed")})
            state["history"].append(row)
            state["probes"].append(probe.to_dict())
            reason = ""
            if collapsed and cfg.stop_on_collapse:
                reason = "collapse"
                log.warning("collapse at step %d: %s", step, {k: row[k] for k in ("general_loss", "repeat_4gram")})
            elif row["val_loss"] < state["best_val"] and not collapsed:
                state["best_val"], state["bad_evals"] = row["val_loss"], 0
                save_weights(model, tokenizer, run_dir / "best", cfg)
            else:
                state["bad_evals"] += 1
                if cfg.early_stop_patience and state["bad_evals"] >= cfg.early_stop_patience:
                    reason = "patience"
            self._write_metrics(state, cfg, reason)
            return reason

        model.train()
        if state["step"] == 0 and not state["history"]:
            evaluation(0, None)  # the "before" probe
        stopped, started = "completed", time.perf_counter() - state["seconds"]
        clock["start"], clock["before"] = time.perf_counter(), state["seconds"]
        bar = tqdm(total=total, initial=state["step"], desc=f"train {cfg.method}", unit="step",
                   disable=not self.progress)
        running, n_running = 0.0, 0
        micro = state["step"] * cfg.grad_accum
        while state["step"] < total:
            optimizer.zero_grad(set_to_none=True)
            for _ in range(cfg.grad_accum):
                epoch, pos = divmod(micro * cfg.batch_size, steps_per_epoch * per_step)
                idx = order(epoch)[pos:pos + cfg.batch_size]
                micro += 1
                batch = {k: v.to(device) for k, v in collate([train_enc[i] for i in idx], pad_id).items()}
                with torch.autocast(device_type=device, dtype=amp_dtype, enabled=use_amp):
                    loss = model(**batch).loss / cfg.grad_accum
                scaler.scale(loss).backward()
                running += loss.detach().item() * cfg.grad_accum
                n_running += 1
                state["samples"] += len(idx)
                state["tokens"] += int(batch["attention_mask"].sum())
            if cfg.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            state["step"] += 1
            bar.update()
            step = state["step"]
            if step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{running / max(1, n_running):.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            state["seconds"] = time.perf_counter() - started
            out_of_time = cfg.max_seconds and state["seconds"] >= cfg.max_seconds
            if step % cfg.eval_every == 0 or step == total or out_of_time:
                reason = evaluation(step, running / max(1, n_running))
                running, n_running = 0.0, 0
                checkpoint(reason)
                if reason:
                    stopped = reason
                    break
            if out_of_time:
                stopped = "time"
                break
        bar.close()
        state["seconds"] = time.perf_counter() - started
        self._write_metrics(state, cfg, stopped)
        from .plots import plot_curves

        plot_curves(state["history"], run_dir / "curves.png", title=f"{cfg.method} · {self.model_dir.name}")
        best = run_dir / "best"
        secs = max(state["seconds"], 1e-9)
        return TrainResult(run_dir=run_dir, best_dir=best if best.is_dir() else None, steps=state["step"],
                           stopped=stopped, best_val_loss=state["best_val"], history=state["history"],
                           probes=state["probes"], seconds=state["seconds"], samples_per_s=state["samples"] / secs,
                           tokens_per_s=state["tokens"] / secs)

    def _write_metrics(self, state: dict[str, Any], cfg: TrainConfig, stopped: str) -> None:
        secs = max(state["seconds"], 1e-9)
        metrics = {"config": asdict(cfg), "base_model": str(self.model_dir), "steps": state["step"],
                   "stopped": stopped or "running", "best_val_loss": state["best_val"],
                   "seconds": round(state["seconds"], 2), "samples_per_s": state["samples"] / secs,
                   "tokens_per_s": state["tokens"] / secs, "history": state["history"], "probes": state["probes"]}
        (self.run_dir / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2, default=str),
                                                   encoding="utf-8")
