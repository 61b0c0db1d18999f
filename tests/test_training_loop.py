"""Label masking, LoRA training on a micro GLM, adapter vs merged agreement, probe scores, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.config import TrainConfig
from training.data import Example
from training.features import IGNORE, collate, encode
from training.probe import CollapseWatch, ProbeScores, distinct_n, empty_rate, is_degenerate, repeated_ngram_rate

PAIRS = [Example(f"医生，我{s}，怎么办？", f"{s}时建议多休息，多喝水，如果症状持续加重请及时就医。")
         for s in ("头痛", "咳嗽", "发烧", "胃痛", "失眠", "腹泻", "胸闷", "乏力")]


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro GLM (64 hidden, 2 layers) with a small tokenizer trained on the project's text."""
    from llm.tiny_model import build_glm, iter_jsonl_text, local_corpus_files, train_tokenizer

    root = tmp_path_factory.mktemp("micro")
    train_tokenizer(iter_jsonl_text(local_corpus_files()), root / "tok", vocab_size=1200)
    return build_glm(root / "tok", root / "model", size="micro")


@pytest.fixture(scope="module")
def tokenizer(micro: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro)


def test_labels_mask_the_prompt_and_end_with_eos(tokenizer) -> None:
    from llm.chat_format import render
    from llm.prompt import compose_message

    ex = PAIRS[0]
    enc = encode(tokenizer, ex, max_len=512, max_target=100)
    prompt = render(tokenizer, [], compose_message(ex.question))
    assert enc.input_ids[: len(prompt)] == prompt  # exactly the served prompt
    assert enc.labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert enc.labels[len(prompt):] == enc.input_ids[len(prompt):]
    assert enc.labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(enc.labels[len(prompt):-1]) == ex.answer


def test_truncation_keeps_target_cap_and_prompt_tail(tokenizer) -> None:
    ex = Example("很长的问题" * 200, "回答" * 300)
    enc = encode(tokenizer, ex, max_len=128, max_target=20)
    assert len(enc.input_ids) <= 128
    assert sum(1 for x in enc.labels if x != IGNORE) == 21  # 20 answer tokens + EOS
    assert tokenizer.decode(enc.input_ids[:-21]).endswith("答：")  # the answer cue survives


def test_collate_pads_right_and_masks_pads(tokenizer) -> None:
    batch = collate([encode(tokenizer, p, 512, 100) for p in PAIRS[:2]] + [encode(tokenizer, PAIRS[0], 20, 5)],
                    tokenizer.pad_token_id)
    short = batch["attention_mask"][2]
    assert short.sum() < short.numel() and short[0] == 1 and short[-1] == 0
    assert (batch["labels"][2][short == 0] == IGNORE).all()


def _lora_model(micro: Path, cfg: TrainConfig):
    from transformers import AutoModelForCausalLM

    from training.lora import apply_lora

    torch.manual_seed(0)
    return apply_lora(AutoModelForCausalLM.from_pretrained(micro, dtype=torch.float32), cfg)


def test_lora_targets_and_loss_goes_down_on_a_repeated_batch(micro: Path, tokenizer) -> None:
    from training.trainer import make_optimizer

    cfg = TrainConfig(lr=1e-2, lora_dropout=0.0)
    model = _lora_model(micro, cfg)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in names)
    batch = collate([encode(tokenizer, p, 128, 40) for p in PAIRS[:4]], tokenizer.pad_token_id)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)  # Lion
    losses = []
    for _ in range(12):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.3, losses


def test_adapter_and_merged_logits_agree(micro: Path, tokenizer, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.merge import merge

    model = _lora_model(micro, TrainConfig())
    with torch.no_grad():  # make the adapter non-trivial (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    merged_dir = merge(tmp_path / "adapter", tmp_path / "merged", base_dir=micro)
    ids = torch.tensor([encode(tokenizer, PAIRS[1], 128, 40).input_ids])
    base = AutoModelForCausalLM.from_pretrained(micro, dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(micro, dtype=torch.float32).eval()
    with torch.no_grad():
        a, m, p = adapter(ids).logits, merged(ids).logits, plain(ids).logits
    assert (a - m).abs().max() < 1e-4
    assert (a - p).abs().max() > 1e-3  # the adapter really changes the model
    assert (merged_dir / "tokenizer.json").is_file() and (merged_dir / "merge_info.json").is_file()


def test_probe_scores_tell_degenerate_from_normal_text() -> None:
    normal = ["感冒一般一周左右可以好转，建议多休息、多喝水，如果高热不退请及时就医。",
              "胃痛可能与饮食不规律有关，建议清淡饮食，必要时做胃镜检查。"]
    looped = ["建议多喝水建议多喝水建议多喝水建议多喝水建议多喝水建议多喝水", "，，，，，，，，，，，，，，，，"]
    assert distinct_n(normal, 2) > 0.9 > 0.4 > distinct_n(looped, 2)
    assert repeated_ngram_rate(looped) > 0.5 > 0.05 > repeated_ngram_rate(normal)
    assert empty_rate(["", " ", "好的"]) == pytest.approx(2 / 3)
    assert is_degenerate(looped) and not is_degenerate(normal)


def _scores(general: float, degenerate: bool) -> ProbeScores:
    return ProbeScores(0, 0.5, 0.5, 0.0, 0.0, general, 3.0, degenerate)


def test_collapse_watch_needs_a_healthy_start_and_flags_forgetting() -> None:
    watch = CollapseWatch(delta=1.0, healthy_below=8.0)
    assert not watch.update(_scores(9.0, True))  # random init: garbage from the start is not collapse
    assert not watch.update(_scores(4.0, False))  # learned something: now healthy
    assert watch.update(_scores(4.2, True))  # degenerate after being healthy
    watch = CollapseWatch(delta=1.0)
    assert not watch.update(_scores(3.0, False))
    assert watch.update(_scores(4.5, False))  # general loss 1.5 nats above its best: forgetting


def test_trainer_keeps_best_writes_metrics_and_resumes(micro: Path, tmp_path: Path) -> None:
    from training.trainer import Trainer

    cfg = TrainConfig(lr=5e-3, max_steps=4, eval_every=2, batch_size=2, max_len=96, max_target=32,
                      probe_max_new_tokens=4, stop_on_collapse=False)
    run = tmp_path / "run"
    result = Trainer(cfg, micro, run, progress=False).run(PAIRS, PAIRS[:2])
    assert result.steps == 4 and result.best_dir is not None
    assert (result.best_dir / "adapter_model.safetensors").is_file() and (run / "curves.png").stat().st_size > 0
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert [r["step"] for r in metrics["history"]] == [0, 2, 4]
    assert {"val_loss", "general_loss", "distinct_2", "repeat_4gram", "empty_rate"} <= set(metrics["history"][-1])
    assert metrics["probes"][0]["samples"]
    cfg.max_steps = 6
    resumed = Trainer(cfg, micro, run, progress=False).run(PAIRS, PAIRS[:2], resume=True)
    assert resumed.steps == 6
    assert [r["step"] for r in resumed.history] == [0, 2, 4, 6]


def test_prefix_tuning_trains(micro: Path, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    from training.ptuning import apply_prefix_tuning

    model = apply_prefix_tuning(AutoModelForCausalLM.from_pretrained(micro, dtype=torch.float32),
                                TrainConfig(pre_seq_len=8))
    batch = collate([encode(tokenizer, p, 96, 32) for p in PAIRS[:2]], tokenizer.pad_token_id)
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
