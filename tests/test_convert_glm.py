"""ChatGLM2-6B / ChatGLM3-6B original checkpoints converted to transformers' GlmForCausalLM reproduce what
their own code computed (golden.json): logits, greedy ids, with and without the original-layout LoRA."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import golden, original_checkpoint
from tests.convert_fixtures import convert_fixture, greedy_ids, load_converted, max_diff

FAMILIES = ("chatglm2-6b", "chatglm3-6b")
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def out_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("converted")


@pytest.mark.parametrize("name", FAMILIES)
def test_conversion_is_fast_and_writes_safetensors_shards(name: str, tmp_path: Path) -> None:
    from llm.convert import convert

    source = original_checkpoint(name)
    import transformers  # noqa: F401  (the one-off import is the interpreter's, not the conversion's)

    # CPU seconds, so that seven other jobs on the same two cores do not decide the result.
    start = time.process_time()
    result = convert(source, tmp_path / "out", progress=False)
    assert time.process_time() - start < 5
    index = json.loads((result.out_dir / "model.safetensors.index.json").read_text(encoding="utf-8"))
    shards = set(index["weight_map"].values())
    assert shards == {p.name for p in result.out_dir.glob("*.safetensors")}
    assert not list(result.out_dir.glob("*.py")) and not list(result.out_dir.glob("*.bin"))
    config = json.loads((result.out_dir / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "glm" and "auto_map" not in config
    original = json.loads((source / "config.json").read_text(encoding="utf-8"))
    assert config["num_key_value_heads"] == original["multi_query_group_num"]
    assert config["head_dim"] == original["kv_channels"]
    assert config["vocab_size"] == original["padded_vocab_size"]


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_greedy_ids_match_the_original_code(name: str, out_root: Path) -> None:
    model = load_converted(convert_fixture(name, out_root))
    for case in golden(name)["chat"]:
        with torch.no_grad():
            logits = model(torch.tensor([case["prompt_ids"]])).logits[0]
        assert max_diff(logits[0], case["first_logits"]) <= TOLERANCE
        assert max_diff(logits[-1], case["last_logits"]) <= TOLERANCE
        generated = model.generate(torch.tensor([case["prompt_ids"]]), max_new_tokens=12, min_new_tokens=12,
                                   do_sample=False)[0, len(case["prompt_ids"]):].tolist()
        assert generated == case["greedy_12_ids"]


@pytest.mark.parametrize("name", FAMILIES)
def test_original_layout_lora_merged_before_the_split(name: str, out_root: Path) -> None:
    expected = golden(name)["lora"]
    model = load_converted(convert_fixture(name, out_root, adapter=True))
    with torch.no_grad():
        logits = model(torch.tensor([expected["prompt_ids"]])).logits[0, -1]
    assert max_diff(logits, expected["last_logits"]) <= TOLERANCE
    assert greedy_ids(model, expected["prompt_ids"], 12) == expected["greedy_12_ids"]
    # The adapter really changes the model (the golden is not the base model's).
    base = load_converted(convert_fixture(name, out_root))
    with torch.no_grad():
        base_logits = base(torch.tensor([expected["prompt_ids"]])).logits[0, -1]
    assert max_diff(base_logits, expected["last_logits"]) > 10 * TOLERANCE


def test_safetensors_source_and_small_output_shards(tmp_path: Path) -> None:
    """The same checkpoint saved as safetensors shards with an index converts to the same model, also when
    the output is split into many small shards."""
    from safetensors.torch import save_file

    from llm.convert import convert
    from llm.convert.shards import iter_tensors, weight_files

    name = "chatglm3-6b"
    source = original_checkpoint(name)
    copy = tmp_path / "st-source"
    copy.mkdir()
    for item in source.iterdir():
        if item.is_file() and not item.name.startswith("pytorch_model"):
            shutil.copy(item, copy / item.name)
    weight_map = {}
    for i, path in enumerate(weight_files(source), start=1):
        tensors = dict(iter_tensors(path))
        save_file(tensors, str(copy / f"model-{i}.safetensors"), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, f"model-{i}.safetensors"))
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}), encoding="utf-8")

    result = convert(copy, tmp_path / "out", progress=False, max_shard_bytes=64 * 1024)
    assert result.shards > 3
    model = load_converted(result.out_dir)
    case = golden(name)["chat"][0]
    with torch.no_grad():
        logits = model(torch.tensor([case["prompt_ids"]])).logits[0, -1]
    assert max_diff(logits, case["last_logits"]) <= TOLERANCE


def test_converted_directory_loads_with_plain_transformers(out_root: Path) -> None:
    """A separate interpreter, outside the repository, that never imports the project."""
    out = convert_fixture("chatglm3-6b", out_root)
    if not (out / "tokenizer.json").is_file():
        pytest.skip("llm/convert/tokenizer.py has not written a tokenizer yet")
    case = golden("chatglm3-6b")["chat"][0]
    script = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"ids = {case['prompt_ids']!r}\n"
        "out = m.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)\n"
        "assert not [n for n in sys.modules if n.split('.')[0] in ('llm', 'service', 'training')]\n"
        "print(json.dumps({'ids': out[0, len(ids):].tolist(), 'text': t.decode(ids)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=out_root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ids"] == case["greedy_12_ids"]
    assert result["text"]


def test_bad_sources_and_adapters_fail_with_what_is_wrong(tmp_path: Path, out_root: Path) -> None:
    from llm.convert import ConversionError, convert

    with pytest.raises(ConversionError, match="no config.json"):
        convert(tmp_path, tmp_path / "a")
    with pytest.raises(ConversionError, match="not an original ChatGLM"):
        convert(convert_fixture("chatglm3-6b", out_root), tmp_path / "b")
    # An adapter for another model size.
    with pytest.raises(ConversionError, match="shape"):
        convert(original_checkpoint("chatglm2-6b"), tmp_path / "c", adapter=_resized_adapter(tmp_path))
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()
    # Weights missing from the directory the index names.
    broken = tmp_path / "broken"
    broken.mkdir()
    source = original_checkpoint("chatglm3-6b")
    for item in ("config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin"):
        shutil.copy(source / item, broken / item)
    with pytest.raises(ConversionError, match="pytorch_model-00002-of-00002.bin"):
        convert(broken, tmp_path / "d")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x").write_text("keep", encoding="utf-8")
    with pytest.raises(ConversionError, match="not empty"):
        convert(source, tmp_path / "e")


def _resized_adapter(tmp_path: Path) -> Path:
    from safetensors.torch import load_file, save_file

    lora = original_checkpoint("chatglm2-6b") / "lora"
    out = tmp_path / "resized-lora"
    out.mkdir()
    shutil.copy(lora / "adapter_config.json", out / "adapter_config.json")
    weights = load_file(str(lora / "adapter_model.safetensors"))
    # lora_B with twice the output rows: trained on a wider model.
    save_file({k: torch.cat([v, v]) if "lora_B" in k else v for k, v in weights.items()},
              str(out / "adapter_model.safetensors"))
    return out


def _chatglm2_config(**overrides: object) -> dict:
    config = json.loads((original_checkpoint("chatglm2-6b") / "config.json").read_text(encoding="utf-8"))
    return {**config, **overrides}


def test_config_fields_follow_the_original() -> None:
    from llm.convert.glm2 import GLM2_WEIGHTS, UnsupportedCheckpoint

    config = GLM2_WEIGHTS.config(_chatglm2_config(rope_ratio=16, multi_query_attention=False, seq_length=4096))
    assert config["rope_parameters"]["rope_theta"] == 160000.0
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert config["num_key_value_heads"] == config["num_attention_heads"]
    assert config["max_position_embeddings"] == 4096
    for variant in ({"rmsnorm": False}, {"add_bias_linear": True}, {"post_layer_norm": False},
                    {"quantization_bit": 4}):
        with pytest.raises(UnsupportedCheckpoint):
            GLM2_WEIGHTS.config(_chatglm2_config(**variant))


def test_fused_qkv_split_follows_the_original_views() -> None:
    """Each fused output row labelled by (head, part, i) as the original's view/split defines it."""
    from llm.convert.glm2 import split_qkv

    heads, groups, dim = 3, 1, 4
    # Multi-query: [q heads | k groups | v groups] along the output rows.
    mqa = torch.arange((heads + 2 * groups) * dim, dtype=torch.float32)
    q, k, v = split_qkv(mqa, _chatglm2_config(num_attention_heads=heads, multi_query_group_num=groups,
                                              kv_channels=dim, multi_query_attention=True))
    assert q.tolist() == list(range(heads * dim)) and k.tolist() == list(range(heads * dim, (heads + 1) * dim))
    # Without multi-query the original views the output as (heads, 3 * dim): q, k, v per head.
    fused = torch.tensor([[h * 100 + part * 10 + i for i in range(dim)] for h in range(heads) for part in range(3)],
                         dtype=torch.float32).reshape(-1)
    q, k, v = split_qkv(fused, _chatglm2_config(num_attention_heads=heads, kv_channels=dim,
                                                multi_query_attention=False))
    for tensor, part in ((q, 0), (k, 1), (v, 2)):
        assert tensor.reshape(heads, dim).tolist() == [[h * 100 + part * 10 + i for i in range(dim)]
                                                       for h in range(heads)]


@pytest.mark.parametrize("options", [{}, {"use_rslora": True}, {"alpha_pattern": {"query_key_value": 4}}],
                         ids=["plain", "rslora", "alpha_pattern"])
def test_state_dict_lora_merge_equals_peft_merge(options: dict, tmp_path: Path) -> None:
    """peft itself is the reference: the same LoRA on a module tree named like the original checkpoint."""
    from peft import LoraConfig, get_peft_model

    from llm.convert.original_lora import OriginalLora

    name = "transformer.encoder.layers.0.self_attention.query_key_value"

    class Tree(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = torch.nn.Module()
            self.transformer.encoder = torch.nn.Module()
            layer = torch.nn.Module()
            layer.self_attention = torch.nn.Module()
            layer.self_attention.query_key_value = torch.nn.Linear(8, 12)
            self.transformer.encoder.layers = torch.nn.ModuleList([layer])

    torch.manual_seed(0)
    base = Tree()
    original = base.state_dict()[name + ".weight"].clone()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["query_key_value"],
                                                 init_lora_weights=False, **options))
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = peft_model.merge_and_unload().state_dict()[name + ".weight"]
    merged = OriginalLora.load(tmp_path / "adapter").apply(name + ".weight", original)
    assert (merged - original).abs().max() > 1e-3
    assert torch.allclose(merged, expected, atol=1e-6)


def test_progress_bar_is_quiet_off_a_terminal() -> None:
    from llm.convert import _progress_bar

    with _progress_bar(3, None) as bar:  # pytest captures stdout: not a terminal
        assert bar.disable
    with _progress_bar(3, True) as bar:
        assert not bar.disable


def test_convert_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.__main__ import main

    source = original_checkpoint("chatglm2-6b")
    assert main(["convert", str(source), str(tmp_path / "out"), "--adapter", str(source / "lora")]) == 0
    printed = capsys.readouterr().out
    assert f"DOCTORGLM_MODEL_PATH={tmp_path / 'out'}" in printed and "merged" in printed
    assert json.loads((tmp_path / "out" / "conversion.json").read_text(encoding="utf-8"))["adapter"]
    assert main(["convert", str(source), str(tmp_path / "out")]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
