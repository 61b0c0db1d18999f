"""oneDNN-packed linear layers for CPU serving (llm/cpu_linear.py): same results as nn.Linear, the engine
packs by default on CPU, and what must not be packed is left alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from llm.cpu_linear import PackedLinear, can_pack, pack_linear_layers
from llm.loading import load_model
from llm.tiny_model import build_glm, iter_jsonl_text, local_corpus_files, train_tokenizer
from service.engine.local import LocalEngine
from service.engine.types import Finished, GenerationRequest, SamplingParams, TokenDelta

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch without oneDNN")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    train_tokenizer(iter_jsonl_text(local_corpus_files()), root / "tok", vocab_size=1024)
    return build_glm(root / "tok", root / "glm", size="micro", seed=5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (8, 48), (3, 7, 48), (300, 48)])
def test_packed_linear_computes_what_nn_linear_does(bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 96, bias=bias).eval()
    packed = PackedLinear(linear)
    x = torch.randn(shape)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    assert packed.weight.shape == linear.weight.shape and packed.weight.dtype == torch.float32
    assert packed.weight.device.type == "meta"  # no second copy of the weights
    assert not list(packed.parameters())


def test_bf16_weights_pack_too() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).to(torch.bfloat16).eval()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear)(x).float(), linear(x).float(), rtol=2e-2, atol=2e-2)


def test_model_logits_are_unchanged_and_packing_is_idempotent(model_dir: Path) -> None:
    reference, packed = load_model(model_dir).model, load_model(model_dir).model
    linears = sum(type(m) is nn.Linear for m in packed.modules())
    assert linears > 0 and pack_linear_layers(packed, min_weights=1) == linears
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert pack_linear_layers(packed, min_weights=1) == 0
    ids = torch.randint(3, 1000, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(packed(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    assert packed.get_output_embeddings().weight.shape == reference.get_output_embeddings().weight.shape


def test_a_tied_output_layer_and_fp16_models_are_left_alone() -> None:
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    tied = LlamaForCausalLM(config).eval()
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    pack_linear_layers(tied, min_weights=1)
    assert type(tied.lm_head) is nn.Linear  # packing it would hold the vocabulary matrix twice
    assert any(isinstance(m, PackedLinear) for m in tied.modules())
    half = LlamaForCausalLM(config).to(torch.float16)
    assert "float32 or bfloat16" in can_pack(half)
    assert pack_linear_layers(half, min_weights=1) == 0


def test_small_layers_stay_nn_linear() -> None:
    # A oneDNN call's fixed cost outweighs what packing saves on a small matrix (MIN_PACKED_WEIGHTS).
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 8192))
    assert pack_linear_layers(model) == 1
    assert type(model[0]) is nn.Linear and isinstance(model[1], PackedLinear)


def _greedy(engine: LocalEngine, questions: list[str]) -> list[str]:
    params = SamplingParams(max_new_tokens=12, min_new_tokens=12, temperature=0.0)

    async def one(question: str) -> str:
        text, done = "", None
        async for event in engine.stream(GenerationRequest(message=question, params=params)):
            if isinstance(event, TokenDelta):
                text += event.text
            else:
                done = event
        assert isinstance(done, Finished)
        return text

    async def together() -> list[str]:
        return list(await asyncio.gather(*(one(q) for q in questions)))

    engine.start()
    try:
        return asyncio.run(together())
    finally:
        engine.stop()


def test_the_engine_packs_on_cpu_and_answers_as_before(default_model_dir: Path) -> None:
    questions = ["孩子发烧三天，咳嗽有痰", "头痛两天了", "胃胀，吃一点就饱，饭后更难受"]
    packed = LocalEngine(load_model(default_model_dir), max_batch_size=4, context_tokens=512)
    plain = LocalEngine(load_model(default_model_dir), max_batch_size=4, context_tokens=512, pack_cpu_linear=False)
    assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    assert packed.vocab_size == plain.vocab_size
    assert _greedy(packed, questions) == _greedy(plain, questions)


def test_the_setting_turns_packing_off(default_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.runtime import make_engine
    from service.settings import Settings

    monkeypatch.setenv("DOCTORGLM_MODEL_PATH", str(default_model_dir))
    monkeypatch.setenv("DOCTORGLM_PACK_CPU_LINEAR", "false")
    off = make_engine(Settings(), progress=False)
    assert not any(isinstance(m, PackedLinear) for m in off.model.modules())
    monkeypatch.setenv("DOCTORGLM_PACK_CPU_LINEAR", "true")
    on = make_engine(Settings(), progress=False)
    assert any(isinstance(m, PackedLinear) for m in on.model.modules())
