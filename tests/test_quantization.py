"""INT8 / INT4 after the merge (llm.quantize): the formats, every model family, the order, the real server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GlmConfig, GlmForCausalLM

from llm.loading import ModelLoadError, attach_adapter, load_model
from llm.quantize import (
    GROUP_SIZES,
    dequantize_int4,
    int4_group_size,
    is_quantized,
    model_summary,
    quantize_int4,
    quantize_int8,
    quantize_merged,
    weight_bytes,
)
from service.engine.local import LocalEngine
from service.engine.types import Finished, SamplingParams
from tests.api_support import QUESTION, sse_events
from tests.conftest import CHATGLM_FAMILIES, REPO_ROOT, original_checkpoint
from tests.engine_fixtures import collect
from tests.server import free_port, start_server

METHODS = ("int8", "int4")
# Bounds for any model shape, from the formats: int8 keeps 1 byte + a 2-byte scale per row (K >= 16: > 3.5x
# smaller than fp32); int4 at worst groups of 16 keeps 0.5 + 4/16 bytes a weight (5.3x). Random weights at
# 8 layers x 512 gave logit cosines of 0.9996 (int8) and 0.93 (int4); the bounds leave room for other sizes.
MIN_SMALLER_THAN_FP32 = {"int8": 3.4, "int4": 5.0}
MIN_COSINE = {"int8": 0.995, "int4": 0.9}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def glm_with_intermediate(tokenizer_dir: Path, out_dir: Path, intermediate: int) -> Path:
    """A small GlmForCausalLM whose MLP width the test chooses (for shape constraints)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GlmConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=intermediate,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                       max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(3)
    GlmForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ----- the integer formats -----


def test_int8_round_trip_is_within_half_a_step_per_row() -> None:
    w = torch.randn(48, 80) * torch.linspace(0.01, 3, 48)[:, None]  # rows of very different ranges
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    error = (q.float() * scale.float()[:, None] - w).abs()
    assert (error <= scale.float()[:, None] * 0.5 + 1e-3 * scale.float()[:, None]).all()


@pytest.mark.parametrize("k", [16, 48, 160, 256, 688])
def test_int4_round_trip_is_within_half_a_step_per_group(k: int) -> None:
    w = torch.randn(24, k)
    group = int4_group_size(k)
    assert group is not None and k % group == 0
    packed, scale, offset = quantize_int4(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (24, k // 2)  # two weights a byte
    back = dequantize_int4(packed, scale, offset, torch.float32)
    step = scale.float().repeat_interleave(group, dim=1)
    assert ((back - w).abs() <= step * 0.5 + 2e-3 * step + 1e-3).all()


def test_int4_group_size_is_the_largest_that_divides() -> None:
    assert int4_group_size(4096) == 128 and int4_group_size(160) == 32 and int4_group_size(688) == 16
    assert int4_group_size(200) is None and min(GROUP_SIZES) == 16


# ----- whole models -----


@pytest.fixture(scope="module")
def float_default(default_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


# Random weights give noise-like logits, the hardest case for int4 (bench/quantization.py measures a
# briefly trained model as well).
@pytest.mark.parametrize("method, min_ratio, min_cosine", [("int8", 1.9, 0.999), ("int4", 3.5, 0.94)])
def test_default_model_is_smaller_and_close(default_model_dir: Path, float_default, method: str,
                                            min_ratio: float, min_cosine: float) -> None:
    ids = torch.randint(5, 8000, (2, 40), generator=torch.Generator().manual_seed(0))
    reference = logits(float_default, ids)
    loaded = load_model(default_model_dir, device="cpu", quantization=method)
    assert is_quantized(loaded.model) and model_summary(loaded.model) == {"dtype": "float32", "quantization": method}
    # Against the 16-bit size of the same weights (the fp32 figure is twice as good).
    assert weight_bytes(float_default) / 2 / weight_bytes(loaded.model) >= min_ratio
    assert cosine(logits(loaded.model, ids), reference) >= min_cosine
    assert not any(isinstance(m, torch.nn.Linear) for m in loaded.model.modules())


@pytest.mark.parametrize("method", METHODS)
def test_quantised_model_streams_on_the_batched_path(default_model_dir: Path, method: str) -> None:
    engine = LocalEngine(load_model(default_model_dir, device="cpu", quantization=method), max_batch_size=4,
                         context_tokens=512)
    assert engine.batched  # the quantised layers keep transformers' DynamicCache: continuous batching
    engine.start()
    params = SamplingParams(max_new_tokens=12, min_new_tokens=12, temperature=0.0)

    async def scenario() -> tuple[list[tuple[str, Finished]], tuple[str, Finished]]:
        together = await asyncio.gather(*(collect(engine, m, params) for m in ("头痛", "发烧咳嗽", "胃痛三天")))
        return together, await collect(engine, "发烧咳嗽", params)

    try:
        together, alone = asyncio.run(scenario())
    finally:
        engine.stop()
    assert all(done.finish_reason == "length" and done.completion_tokens == 12 for _, done in together)
    assert together[1][0] == alone[0]  # greedy: the same answer inside a batch of three and alone


@pytest.mark.parametrize("family", CHATGLM_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_converted_chatglm_families_quantise(family: str, method: str, tmp_path_factory) -> None:
    source = original_checkpoint(family)
    cache = tmp_path_factory.mktemp(f"converted-{family}")
    plain = load_model(source, device="cpu", cache_dir=cache)
    quantised = load_model(source, device="cpu", quantization=method, cache_dir=cache)
    ids = torch.tensor([plain.tokenizer.encode("头痛恶心两天，怎么办")])
    assert cosine(logits(quantised.model, ids), logits(plain.model, ids)) >= MIN_COSINE[method]
    assert weight_bytes(quantised.model) < weight_bytes(plain.model) / MIN_SMALLER_THAN_FP32[method]
    assert LocalEngine(quantised, context_tokens=256).batched


@pytest.mark.parametrize("method", METHODS)
def test_glm4_hf_layout_quantises(default_model_dir: Path, tmp_path: Path, method: str) -> None:
    from transformers import Glm4Config, Glm4ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    config = Glm4Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(5)
    Glm4ForCausalLM(config).save_pretrained(tmp_path / "glm4")
    tokenizer.save_pretrained(tmp_path / "glm4")
    plain = load_model(tmp_path / "glm4", device="cpu")
    quantised = load_model(tmp_path / "glm4", device="cpu", quantization=method)
    ids = torch.tensor([plain.tokenizer.encode("胸闷气短，夜里加重")])
    assert cosine(logits(quantised.model, ids), logits(plain.model, ids)) >= MIN_COSINE[method]
    assert LocalEngine(quantised, context_tokens=256).batched


# ----- the order: merge, then quantise -----


@pytest.fixture(scope="module")
def adapter_dir(default_model_dir: Path, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(default_model_dir)
    torch.manual_seed(7)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, config).save_pretrained(folder)
    return folder


def test_adapter_is_merged_before_quantising(default_model_dir: Path, adapter_dir: Path, float_default) -> None:
    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 12]])
    loaded = load_model(default_model_dir, adapter_dir=adapter_dir, device="cpu", quantization="int8")
    fresh = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    by_hand = quantize_merged(attach_adapter(fresh, adapter_dir), "int8")
    assert torch.equal(logits(loaded.model, ids), logits(by_hand, ids))  # exactly merge → quantise
    without_adapter = quantize_merged(
        AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32), "int8")
    assert (logits(loaded.model, ids) - logits(without_adapter, ids)).abs().max() > 1e-2  # the adapter is in


def test_merging_into_a_quantised_model_is_refused(default_model_dir: Path, adapter_dir: Path) -> None:
    quantised = quantize_merged(AutoModelForCausalLM.from_pretrained(default_model_dir), "int4")
    with pytest.raises(ModelLoadError, match="merge it first, then quantise"):
        attach_adapter(quantised, adapter_dir)
    from peft import LoraConfig, get_peft_model

    # And impossible underneath: no nn.Linear is left for peft to wrap.
    with pytest.raises(ValueError):
        get_peft_model(quantised, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ModelLoadError, match="already quantised"):
        quantize_merged(quantised, "int8")


# ----- unsupported shapes: a start-up error that names the constraint -----


def test_int4_refuses_a_layer_no_group_divides(default_model_dir: Path, tmp_path: Path) -> None:
    odd = glm_with_intermediate(default_model_dir, tmp_path / "odd", intermediate=200)  # down_proj in=200
    with pytest.raises(ModelLoadError, match=r"multiple of 16.*down_proj has 200"):
        load_model(odd, device="cpu", quantization="int4")
    assert is_quantized(load_model(odd, device="cpu", quantization="int8").model)  # int8 has no constraint


def test_service_refuses_to_start_with_the_constraint_named(cache_dir: Path, default_model_dir: Path,
                                                             tmp_path: Path) -> None:
    odd = glm_with_intermediate(default_model_dir, tmp_path / "odd", intermediate=200)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DOCTORGLM_HOST": "127.0.0.1", "DOCTORGLM_PORT": str(free_port()),
           "DOCTORGLM_CACHE_DIR": str(cache_dir), "DOCTORGLM_MODEL_PATH": str(odd),
           "DOCTORGLM_QUANTIZATION": "int4"}
    # `python -m service` loads before it listens: the process ends with one line, not at the first request.
    done = subprocess.run([sys.executable, "-m", "service"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode != 0
    assert "ModelLoadError" in done.stderr and "multiple of 16" in done.stderr and "down_proj has 200" in done.stderr
    assert "Traceback" not in done.stderr


# ----- the real server -----


@pytest.mark.parametrize("method", METHODS)
def test_real_server_streams_quantised(method: str, cache_dir: Path, default_model_dir: Path,
                                       tmp_path: Path) -> None:
    server = start_server(cache_dir, tmp_path, {"DOCTORGLM_QUANTIZATION": method, "DOCTORGLM_DEVICE": "cpu"})
    try:
        ready = httpx.get(server.url + "/readyz", timeout=10).json()
        assert ready["quantization"] == method and ready["dtype"] == "float32"
        assert ready["model"] == default_model_dir.name and ready["adapter"] is None
        models = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["doctorglm"]
        assert models == {"model": default_model_dir.name, "adapter": None, "dtype": "float32",
                          "quantization": method}
        with httpx.stream("POST", server.url + "/chat/stream",
                          json={"prompt": QUESTION, "max_new_tokens": 16, "min_new_tokens": 16}, timeout=60) as r:
            assert r.status_code == 200
            events = sse_events(r)
        names = [n for n, _ in events]
        assert names[0] == "meta" and names[-1] == "done" and names.count("delta") >= 2
        meta, done = events[0][1], events[-1][1]
        assert meta["references"] and meta["references"][0]["name"]
        assert meta["safety"]["notice"] and done["safety"]["notice"] == meta["safety"]["notice"]
        assert done["usage"]["completion_tokens"] == 16 and done["finish_reason"] == "length"
    finally:
        server.stop()


# ----- the GPU check's logic, on CPU -----


def test_gpu_check_script_runs_on_cpu(tmp_path: Path) -> None:
    import json

    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "cpu", "--small", "--tokens", "12"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check_cpu.json").read_text(encoding="utf-8"))
    assert set(report["modes"]) == {"fp32", "int8", "int4"}
    assert report["model"]["parameters"] > 1_000_000
    sizes = [report["modes"][m]["weight_bytes"] for m in ("fp32", "int8", "int4")]
    assert sizes[0] > sizes[1] > sizes[2]
    for row in report["modes"].values():
        for batch in (1, 8):
            run = row[f"batch{batch}"]
            assert run["batched_path"] and run["completion_tokens"] == 12 * batch and run["tokens_per_s"] > 0
            assert 0 < run["ttft_s_max"] <= run["wall_s"]
    assert (tmp_path / "gpu_check.log").is_file()
