"""`python -m training train` on a converted ChatGLM3 runs end to end with the family's LoRA targets, and the
adapter merges at load (also when DOCTORGLM_MODEL_PATH is the ORIGINAL directory the copy came from)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import golden, original_checkpoint
from tests.convert_fixtures import convert_fixture, load_converted


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from llm.paths import REPO_ROOT
    from training.__main__ import main

    root = tmp_path_factory.mktemp("train-converted")
    model_dir = convert_fixture("chatglm3-6b", root)
    data = REPO_ROOT / "knowledge" / "data" / "sample_dialogues.jsonl"
    code = main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(root / "run"), "--quiet",
                 "--max-steps", "4", "--eval-every", "2", "--batch-size", "2", "--lr", "1e-2", "--max-len", "96",
                 "--max-target", "24", "--probe-max-new-tokens", "4", "--max-val-examples", "8",
                 "--stop-on-collapse", "false", "--threads", "1"])
    assert code == 0
    metrics = json.loads((root / "run" / "metrics.json").read_text(encoding="utf-8"))
    return {"model": model_dir, "adapter": root / "run" / "best", "metrics": metrics, "root": root}


def test_training_uses_the_family_targets_and_learns(trained: dict) -> None:
    from llm.families import GLM

    config = json.loads((trained["adapter"] / "adapter_config.json").read_text(encoding="utf-8"))
    assert sorted(config["target_modules"]) == sorted(GLM.lora_targets)
    assert trained["metrics"]["steps"] == 4
    losses = [row["val_loss"] for row in trained["metrics"]["history"] if row.get("val_loss") is not None]
    assert len(losses) >= 2 and losses[-1] < losses[0]


def test_the_adapter_merges_at_load(trained: dict) -> None:
    from peft import PeftModel

    from llm.loading import load_model

    ids = torch.tensor([golden("chatglm3-6b")["chat"][0]["prompt_ids"]])
    with torch.no_grad():
        plain = load_converted(trained["model"])(ids).logits
        unmerged = PeftModel.from_pretrained(load_converted(trained["model"]), trained["adapter"])(
            input_ids=ids).logits
        merged = load_model(trained["model"], adapter_dir=trained["adapter"]).model(ids).logits
        from_original = load_model(original_checkpoint("chatglm3-6b"), adapter_dir=trained["adapter"],
                                   cache_dir=trained["root"] / "cache").model(ids).logits
    assert (unmerged - plain).abs().max() > 1e-3  # training changed the model
    assert torch.allclose(merged, unmerged, atol=1e-4)
    assert torch.allclose(from_original, unmerged, atol=1e-4)


def test_training_on_an_original_directory_says_convert_first(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from training.__main__ import main

    source = original_checkpoint("chatglm3-6b")
    assert main(["train", "--model", str(source), "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "python -m training convert" in capsys.readouterr().err
