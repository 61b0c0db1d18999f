"""P-tuning v2 prefixes (ChatGLM ptuning/main.py checkpoints and peft PrefixTuning adapters) as PrefixKV:
served from position 0 in a prefilled cache, they reproduce what the original code / peft computed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import golden, original_checkpoint
from tests.convert_fixtures import convert_fixture, greedy_ids, load_converted, max_diff

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def out_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("converted")


@pytest.mark.parametrize("name", ["chatglm2-6b", "chatglm3-6b"])
def test_ptuning_checkpoint_matches_the_original_code(name: str, out_root: Path) -> None:
    from llm.prefix import load_prefix, prefix_cache, prefix_kind

    expected = golden(name)["ptuning"]
    checkpoint = original_checkpoint(name) / expected["checkpoint_dir"]
    model = load_converted(convert_fixture(name, out_root))
    assert prefix_kind(checkpoint) == "ptuning"
    prefix = load_prefix(checkpoint, model)
    assert len(prefix) == model.config.num_hidden_layers
    assert prefix[0][0].shape == (1, model.config.num_key_value_heads, expected["pre_seq_len"],
                                  model.config.head_dim)
    ids = expected["prompt_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), position_ids=torch.arange(len(ids))[None],
                       cache=prefix_cache(prefix, 1, model.config)).logits[0, -1]
    assert max_diff(logits, expected["last_logits"]) <= TOLERANCE
    assert greedy_ids(model, ids, 12, prefix_cache(prefix, 1, model.config)) == expected["greedy_12_ids"]


def test_peft_prefix_adapter_served_from_position_zero_matches_peft(out_root: Path, tmp_path: Path) -> None:
    """peft shifts positions by the prefix length; the loaded prefix makes position-0 serving equal to it."""
    from peft import PeftModel, PrefixTuningConfig, TaskType, get_peft_model

    from llm.prefix import load_prefix, prefix_cache, prefix_kind

    model_dir = convert_fixture("chatglm3-6b", out_root)
    peft_model = get_peft_model(load_converted(model_dir), PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5, prefix_projection=False))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in peft_model.prompt_encoder.parameters():
            param.normal_(0, 1.0)
    peft_model.save_pretrained(tmp_path / "prefix")
    assert prefix_kind(tmp_path / "prefix") == "peft"

    ids = torch.tensor([golden("chatglm3-6b")["chat"][1]["prompt_ids"]])
    reference = PeftModel.from_pretrained(load_converted(model_dir), tmp_path / "prefix").eval()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits[0]
        model = load_converted(model_dir)
        prefix = load_prefix(tmp_path / "prefix", model)
        served = model(ids, position_ids=torch.arange(ids.shape[1])[None],
                       cache=prefix_cache(prefix, 1, model.config)).logits[0]
        plain = model(ids).logits[0]
    assert (served - expected).abs().max().item() <= 1e-4
    assert (plain - expected).abs().max().item() > 100 * 1e-4  # the prefix matters


def _projection_checkpoint(tmp_path: Path, bias: torch.Tensor) -> Path:
    """A prefix_projection=true checkpoint whose MLP's last layer has zero weights: every row == bias."""
    source = original_checkpoint("chatglm3-6b") / "ptuning"
    out = tmp_path / "projection"
    out.mkdir()
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config["prefix_projection"] = True
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    state = torch.load(source / "pytorch_model.bin", weights_only=True)
    embedding = state["transformer.prefix_encoder.embedding.weight"]
    width, hidden = embedding.shape[1], config["hidden_size"]
    torch.save({"transformer.prefix_encoder.embedding.weight": embedding,
                "transformer.prefix_encoder.trans.0.weight": torch.randn(hidden, width),
                "transformer.prefix_encoder.trans.0.bias": torch.randn(hidden),
                "transformer.prefix_encoder.trans.2.weight": torch.zeros(width, hidden),
                "transformer.prefix_encoder.trans.2.bias": bias}, out / "pytorch_model.bin")
    return out


def test_prefix_projection_runs_the_prefix_mlp(tmp_path: Path) -> None:
    from llm.prefix import load_ptuning

    config = json.loads((original_checkpoint("chatglm3-6b") / "ptuning" / "config.json").read_text("utf-8"))
    groups, head_dim = config["multi_query_group_num"], config["kv_channels"]
    bias = torch.randn(config["num_layers"] * 2 * groups * head_dim)
    prefix = load_ptuning(_projection_checkpoint(tmp_path, bias))
    per_layer = bias.reshape(config["num_layers"] * 2, groups, head_dim)
    for layer, (key, value) in enumerate(prefix):
        for position in range(config["pre_seq_len"]):
            assert torch.allclose(key[0, :, position], per_layer[2 * layer])
            assert torch.allclose(value[0, :, position], per_layer[2 * layer + 1])


def test_a_prefix_for_another_model_is_refused(tmp_path: Path) -> None:
    from transformers import GlmConfig, GlmForCausalLM

    from llm.prefix import PrefixError, load_prefix, prefix_kind

    other = GlmForCausalLM(GlmConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0,
                                     eos_token_id=1))
    with pytest.raises(PrefixError, match="another model"):
        load_prefix(original_checkpoint("chatglm3-6b") / "ptuning", other)
    # A full model directory with pre_seq_len in its config is not a prefix checkpoint.
    assert prefix_kind(original_checkpoint("chatglm3-6b")) is None
    broken = tmp_path / "not-a-prefix"
    shutil.copytree(original_checkpoint("chatglm3-6b") / "lora", broken)
    assert prefix_kind(broken) is None
    with pytest.raises(PrefixError, match="neither"):
        load_prefix(broken, other)


@pytest.mark.parametrize("name", ["chatglm-6b", "chatglm2-6b"])
def test_a_prefix_embedding_that_does_not_fit_its_own_config_is_a_load_error(name: str, tmp_path: Path) -> None:
    from llm.loading import ModelLoadError, load_model
    from llm.prefix import PTUNING_EMBEDDING

    source = original_checkpoint(name)
    checkpoint = tmp_path / "ptuning"
    shutil.copytree(source / "ptuning", checkpoint)
    state = torch.load(checkpoint / "pytorch_model.bin", weights_only=True)
    state[PTUNING_EMBEDDING] = state[PTUNING_EMBEDDING][:, :-1].clone()  # one column short
    torch.save(state, checkpoint / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="does not fit|expected"):
        load_model(source, adapter_dir=checkpoint, cache_dir=tmp_path / "cache")
