"""The project's ChatGLM-6B class against what the original code computed (golden.json), and on its own:
positions, the prefix-LM mask, left-padded batches, the engine's step-wise scheme, other sizes,
training (labels, LoRA on query_key_value, `python -m training train`) and the batched engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llm.chatglm6b  # noqa: F401  (registers the class with the Auto classes)
from llm.chatglm6b import ChatGLM6BConfig, ChatGLM6BForCausalLM, ChatGLM6BPositions
from llm.chatglm6b.positions import SpecialIds, chatglm6b_position_ids
from llm.convert.chatglm6b import CHATGLM6B_WEIGHTS
from tests.conftest import REPO_ROOT, golden, original_checkpoint

FAMILY = "chatglm-6b"
TOLERANCE = 1e-3
GREEDY = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False}
# Special ids of a small model of another size (the fixture's are the same numbers; nothing depends on them).
IDS = {"bos_token_id": 8, "eos_token_id": 9, "mask_token_id": 4, "gmask_token_id": 5, "pad_token_id": 3}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llm.convert import convert

    return convert(original_checkpoint(FAMILY), tmp_path_factory.mktemp("c6b") / "model").out_dir


def _load(model_dir: Path) -> ChatGLM6BForCausalLM:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert isinstance(model, ChatGLM6BForCausalLM)
    return model


@pytest.fixture(scope="module")
def model(converted: Path) -> ChatGLM6BForCausalLM:
    return _load(converted)


def _greedy(model: ChatGLM6BForCausalLM, prompt: list[int], **kwargs) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, pad_token_id=model.config.pad_token_id, **GREEDY, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def _max_diff(logits: torch.Tensor, expected: list[float]) -> float:
    return float((logits - torch.tensor(expected)).abs().max())


# --- fidelity: the goldens ------------------------------------------------------------------------------

def test_every_chat_case_matches_the_original_logits_and_greedy_ids(model: ChatGLM6BForCausalLM) -> None:
    cases = golden(FAMILY)["chat"]
    assert cases
    for case in cases:
        with torch.no_grad():
            logits = model(torch.tensor([case["prompt_ids"]])).logits[0]
        assert _max_diff(logits[0], case["first_logits"]) < TOLERANCE
        assert _max_diff(logits[-1], case["last_logits"]) < TOLERANCE
        assert _greedy(model, case["prompt_ids"]) == case["greedy_12_ids"]


def test_long_greedy_answers_follow_the_original_chat_token_for_token(model: ChatGLM6BForCausalLM) -> None:
    """chat(do_sample=False) answers of 143-250 tokens (one left-padded batch): block positions far past
    the prompt stay exact."""
    cases = golden(FAMILY)["chat"]
    width = max(len(c["prompt_ids"]) for c in cases)
    longest = max(len(c["chat_output_ids"]) for c in cases)
    pad = model.config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(c["prompt_ids"])) + c["prompt_ids"] for c in cases])
    mask = torch.tensor([[0] * (width - len(c["prompt_ids"])) + [1] * len(c["prompt_ids"]) for c in cases])
    out = model.generate(ids, attention_mask=mask, pad_token_id=pad, max_new_tokens=longest, min_new_tokens=longest,
                         do_sample=False)
    for row, case in zip(out, cases, strict=True):
        assert row[width:width + len(case["chat_output_ids"])].tolist() == case["chat_output_ids"]


def test_eager_attention_equals_sdpa(converted: Path) -> None:
    from transformers import AutoModelForCausalLM

    case = golden(FAMILY)["chat"][1]
    eager = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32, attn_implementation="eager").eval()
    sdpa = _load(converted)
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        ids = torch.tensor([case["prompt_ids"]])
        assert torch.allclose(eager(ids).logits, sdpa(ids).logits, atol=1e-4)
    assert _max_diff(eager(ids).logits[0, -1].detach(), case["last_logits"]) < TOLERANCE


def test_original_lora_merged_by_the_converter_matches_the_peft_golden(tmp_path: Path) -> None:
    from llm.convert import convert

    source = original_checkpoint(FAMILY)
    expected = golden(FAMILY)["lora"]
    merged = _load(convert(source, tmp_path / "lora", adapter=source / expected["adapter_dir"]).out_dir)
    with torch.no_grad():
        logits = merged(torch.tensor([expected["prompt_ids"]])).logits[0, -1]
    assert _max_diff(logits, expected["last_logits"]) < TOLERANCE
    assert _greedy(merged, expected["prompt_ids"]) == expected["greedy_12_ids"]


def test_the_original_lora_applies_unchanged_with_peft(model: ChatGLM6BForCausalLM, converted: Path) -> None:
    """Module names are the original's, so DoctorGLM's adapter loads onto the class as it is."""
    from peft import PeftModel

    source = original_checkpoint(FAMILY)
    expected = golden(FAMILY)["lora"]
    adapted = PeftModel.from_pretrained(_load(converted), source / expected["adapter_dir"]).eval()
    with torch.no_grad():
        logits = adapted(input_ids=torch.tensor([expected["prompt_ids"]])).logits[0, -1]
    assert _max_diff(logits, expected["last_logits"]) < TOLERANCE


def test_ptuning_prefix_in_the_cache_matches_the_golden(model: ChatGLM6BForCausalLM) -> None:
    from llm.prefix import load_prefix, prefix_cache

    source = original_checkpoint(FAMILY)
    expected = golden(FAMILY)["ptuning"]
    prefix = load_prefix(source / expected["checkpoint_dir"], model)
    config = model.config
    assert len(prefix) == config.num_layers
    assert prefix[0][0].shape == (1, config.num_attention_heads, expected["pre_seq_len"], config.head_dim)
    prompt = torch.tensor([expected["prompt_ids"]])
    # The mask covers prefix + prompt; positions come from the prompt alone (not shifted by the prefix).
    mask = torch.ones((1, expected["pre_seq_len"] + prompt.shape[1]), dtype=torch.long)
    with torch.no_grad():
        logits = model(prompt, cache=prefix_cache(prefix), attention_mask=mask).logits[0, -1]
    assert _max_diff(logits, expected["last_logits"]) < TOLERANCE
    out = model.generate(prompt, cache=prefix_cache(prefix), attention_mask=mask, **GREEDY)
    assert out[0, prompt.shape[1]:].tolist() == expected["greedy_12_ids"]
    assert expected["greedy_12_ids"] != _greedy(model, expected["prompt_ids"])  # the prefix matters


def test_prefix_kv_follows_the_original_view_and_permute_order() -> None:
    original = {"num_layers": 3, "num_attention_heads": 2, "hidden_size": 8}
    length, heads, head_dim = 5, 2, 4
    embedding = torch.arange(length * 3 * 2 * 8, dtype=torch.float32).view(length, 3 * 2 * 8)
    # modeling_chatglm.py get_prompt: view (batch, P, layers*2, heads, head_dim), permute [2, 1, 0, 3, 4],
    # split(2): per layer (key, value), each (P, batch, heads, head_dim).
    reference = embedding[None].view(1, length, 6, heads, head_dim).permute([2, 1, 0, 3, 4]).split(2)
    got = CHATGLM6B_WEIGHTS.prefix_kv(embedding, original)
    assert len(got) == 3
    for (key, value), pair in zip(got, reference, strict=True):
        assert torch.equal(key, pair[0].permute(1, 2, 0, 3))  # → (batch, heads, P, head_dim)
        assert torch.equal(value, pair[1].permute(1, 2, 0, 3))
    with pytest.raises(ValueError, match="does not fit"):
        CHATGLM6B_WEIGHTS.prefix_kv(torch.zeros(length, 7), original)


def test_left_padded_mixed_batch_gives_each_prompt_its_greedy_alone(model: ChatGLM6BForCausalLM) -> None:
    prompts = [c["prompt_ids"] for c in golden(FAMILY)["chat"]]
    assert len({len(p) for p in prompts}) > 1
    width = max(map(len, prompts))
    pad = model.config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, pad_token_id=pad, **GREEDY)
    alone = [_greedy(model, p) for p in prompts]
    assert [row[width:].tolist() for row in out] == alone


# --- the weight map -------------------------------------------------------------------------------------

def test_weight_map_config_and_tensors() -> None:
    source = original_checkpoint(FAMILY)
    original = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config = CHATGLM6B_WEIGHTS.config(original)
    assert config["model_type"] == "chatglm6b-doctorglm" and "auto_map" not in config
    for field in ("vocab_size", "hidden_size", "inner_hidden_size", "num_layers", "num_attention_heads",
                  "layernorm_epsilon", "max_sequence_length", "bos_token_id", "eos_token_id", "mask_token_id",
                  "gmask_token_id", "pad_token_id", "position_encoding_2d"):
        assert config[field] == original[field]
    assert ChatGLM6BConfig(**config).max_position_embeddings == original["max_sequence_length"]
    qkv = torch.zeros(3, 2)
    assert list(CHATGLM6B_WEIGHTS.tensors("transformer.layers.0.attention.query_key_value.weight", qkv, original)) \
        == [("transformer.layers.0.attention.query_key_value.weight", qkv)]
    assert not list(CHATGLM6B_WEIGHTS.tensors("transformer.layers.0.attention.rotary_emb.inv_freq", qkv, original))
    with pytest.raises(ValueError, match="quantised"):
        CHATGLM6B_WEIGHTS.config({**original, "quantization_bit": 4})


# --- positions and masks, on any size -------------------------------------------------------------------

def _ids(two_d: bool = True) -> SpecialIds:
    return SpecialIds(bos=8, gmask=5, mask=4, two_d=two_d)


def test_positions_follow_the_gmask_and_sop_rules() -> None:
    #          0   1   2  [gMASK] <sop>  generated
    prompt = [20, 21, 22, 5, 8, 30, 31]
    got = chatglm6b_position_ids(torch.tensor([prompt]), None, _ids())
    assert got[0, 0].tolist() == [0, 1, 2, 3, 3, 3, 3]  # from <sop> on: the [gMASK] position
    assert got[0, 1].tolist() == [0, 0, 0, 0, 1, 2, 3]  # block positions count from <sop>
    with_mask = chatglm6b_position_ids(torch.tensor([[20, 4, 21, 22, 8, 30]]), None, _ids())
    assert with_mask[0, 0].tolist() == [0, 1, 2, 3, 1, 1]  # [MASK] in the middle: its position
    # 1-D: after [gMASK] the numbering continues, after [MASK] it stays at the mask.
    assert chatglm6b_position_ids(torch.tensor([prompt]), None, _ids(False))[0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert chatglm6b_position_ids(torch.tensor([[20, 4, 21, 8, 30]]), None, _ids(False))[0].tolist() == \
        [0, 1, 2, 1, 1]
    # No <sop>: all context, numbered 0, 1, 2, ...
    assert chatglm6b_position_ids(torch.tensor([[20, 21, 22]]), None, _ids())[0].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_left_padding_does_not_move_positions() -> None:
    prompt = [20, 21, 5, 8, 30]
    padded = torch.tensor([[3, 3, *prompt]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    alone = chatglm6b_position_ids(torch.tensor([prompt]), None, _ids())
    assert torch.equal(chatglm6b_position_ids(padded, mask, _ids())[..., 2:], alone)


@pytest.mark.parametrize("two_d", [True, False])
@pytest.mark.parametrize("prompt", [[20, 21, 5, 8], [20, 4, 21, 8], [20, 21, 22]])
def test_the_engine_scheme_steps_through_the_same_positions_as_a_full_forward(two_d: bool, prompt: list[int]) -> None:
    config = ChatGLM6BConfig(vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=2,
                             inner_hidden_size=64, position_encoding_2d=two_d, **IDS)
    scheme = ChatGLM6BPositions(config)
    generated = [40, 41, 42, 43]
    full = chatglm6b_position_ids(torch.tensor([prompt + generated]), None, SpecialIds.of(config))
    assert torch.equal(scheme.prefill(prompt, torch.device("cpu")), full[..., :len(prompt)])
    state = scheme.first(prompt, torch.device("cpu"))
    for step in range(len(generated)):
        assert torch.equal(scheme.as_input(state), full[..., len(prompt) + step:len(prompt) + step + 1])
        state = scheme.advance(state)


def _random_model(two_d: bool = True, seed: int = 0, **sizes) -> ChatGLM6BForCausalLM:
    shape = {"vocab_size": 300, "hidden_size": 96, "inner_hidden_size": 384, "num_layers": 3,
             "num_attention_heads": 6, **sizes}
    config = ChatGLM6BConfig(position_encoding_2d=two_d, initializer_range=0.2, **shape, **IDS)
    torch.manual_seed(seed)
    return ChatGLM6BForCausalLM(config).eval()


def _prompts(count: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 300, (6 + 5 * i,), generator=gen).tolist() + [5, 8] for i in range(count)]


@pytest.mark.parametrize("two_d", [True, False])
def test_another_size_saves_loads_and_batches_like_alone(two_d: bool, tmp_path: Path) -> None:
    model = _random_model(two_d)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert saved["model_type"] == "chatglm6b-doctorglm" and "auto_map" not in saved
    loaded = _load(tmp_path)
    prompts = _prompts(3)
    alone = [_greedy(loaded, p) for p in prompts]
    assert len({tuple(a) for a in alone}) > 1  # random weights still give different answers
    width = max(map(len, prompts))
    ids = torch.tensor([[3] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = loaded.generate(ids, attention_mask=mask, pad_token_id=3, **GREEDY)
    assert [row[width:].tolist() for row in out] == alone


def test_cached_step_by_step_decode_equals_the_full_forward() -> None:
    """The engine's way (a DynamicCache, the scheme's positions per step) against one forward over all of it."""
    from transformers import DynamicCache

    model = _random_model(num_layers=4, num_attention_heads=4, hidden_size=64, inner_hidden_size=128)
    scheme = ChatGLM6BPositions(model.config)
    prompt, generated = _prompts(1)[0], [50, 51, 52, 53, 54]
    with torch.no_grad():
        full = model(torch.tensor([prompt + generated])).logits[0]
        out = model(torch.tensor([prompt]), cache=DynamicCache(), use_cache=True,
                    position_ids=scheme.prefill(prompt, torch.device("cpu")))
        cache, state = out.cache, scheme.first(prompt, torch.device("cpu"))
        assert torch.allclose(out.logits[0], full[:len(prompt)], atol=1e-5)
        layer = cache.layers[0]
        assert layer.keys.shape == (1, 4, len(prompt), 16) and layer.values.shape == layer.keys.shape
        for step, token in enumerate(generated):
            out = model(torch.tensor([[token]]), cache=cache, position_ids=scheme.as_input(state), use_cache=True,
                        attention_mask=torch.ones((1, len(prompt) + step + 1), dtype=torch.long))
            cache, state = out.cache, scheme.advance(state)
            assert torch.allclose(out.logits[0, -1], full[len(prompt) + step], atol=1e-5)


def test_context_attends_both_ways_and_the_block_causally() -> None:
    model = _random_model()
    prompt = _prompts(1)[0]
    changed = prompt[:2] + [prompt[2] + 1] + prompt[3:]
    with torch.no_grad():
        before, after = model(torch.tensor([prompt])).logits[0], model(torch.tensor([changed])).logits[0]
        # A later context token changes an earlier context position's output (bidirectional context) ...
        assert not torch.allclose(before[0], after[0])
        # ... but a generated token never changes what came before it (causal block).
        base = model(torch.tensor([prompt + [60, 61]])).logits[0]
        other = model(torch.tensor([prompt + [60, 62]])).logits[0]
    assert torch.allclose(base[:-1], other[:-1], atol=1e-6) and not torch.allclose(base[-1], other[-1])


def test_logits_to_keep_and_embeddings() -> None:
    model = _random_model()
    ids = torch.tensor(_prompts(1))
    with torch.no_grad():
        assert torch.allclose(model(ids, logits_to_keep=1).logits[0, -1], model(ids).logits[0, -1], atol=1e-6)
    assert model.get_input_embeddings() is model.transformer.word_embeddings
    assert model.get_output_embeddings() is model.lm_head


def test_a_head_size_rotary_cannot_split_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple"):
        ChatGLM6BConfig(hidden_size=60, num_attention_heads=6)  # head size 10: not a multiple of 4


# --- training -------------------------------------------------------------------------------------------

def test_labels_give_the_shifted_loss_and_lora_on_query_key_value_learns() -> None:
    from peft import LoraConfig, get_peft_model

    model = _random_model()
    prompts = _prompts(2)
    ids = torch.tensor([prompts[0] + [40, 41, 9], prompts[1][:len(prompts[0]) + 3]])
    labels = ids.clone()
    labels[:, :len(prompts[0])] = -100
    logits = model(ids).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
    assert torch.allclose(model(ids, labels=labels).loss, expected, atol=1e-5)

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"]))
    peft_model.train()
    peft_model.base_model.model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(6):
        loss = peft_model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_training_cli_trains_lora_on_a_converted_chatglm6b(converted: Path, tmp_path: Path) -> None:
    data = REPO_ROOT / "knowledge" / "data" / "sample_dialogues.jsonl"
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "training", "train", "--model", str(converted), "--data", str(data),
         "--out", str(run), "--max-steps", "3", "--eval-every", "3", "--batch-size", "2", "--max-len", "96",
         "--max-target", "24", "--probe-max-new-tokens", "4", "--lr", "1e-2", "--quiet"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 3
    adapter = run / "best"
    assert json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))["target_modules"] == \
        ["query_key_value"]
    from safetensors.torch import load_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    lora_b = [t for name, t in weights.items() if "query_key_value.lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # it trained (B starts at zero)

    from llm.loading import load_model

    served = load_model(converted, adapter_dir=adapter, dtype="fp32", device="cpu")  # merged at load
    assert isinstance(served.model, ChatGLM6BForCausalLM)


# --- the batched engine ---------------------------------------------------------------------------------

def test_engine_batched_greedy_equals_serial_and_the_golden(converted: Path) -> None:
    from llm.loading import load_model
    from service.engine.local import LocalEngine
    from service.engine.types import GenerationRequest, SamplingParams
    from tests.test_engine_batched import run_engine

    loaded = load_model(converted, dtype="fp32", device="cpu")
    engine = LocalEngine(loaded, context_tokens=512, prompt_cache_mb=16)
    assert engine.batched and isinstance(engine.positions, ChatGLM6BPositions)
    assert engine.prompt_cache is None  # its prompt attends both ways: a prefix's keys depend on what follows
    case = golden(FAMILY)["chat"][0]
    greedy = SamplingParams(max_new_tokens=12, min_new_tokens=12, temperature=0.0)
    assert engine.prepare(GenerationRequest(message=case["query"], params=greedy)) == case["prompt_ids"]
    requests = [("头痛恶心" * i, SamplingParams(max_new_tokens=4 + 3 * i, min_new_tokens=4 + 3 * i,
                                               temperature=0.0)) for i in range(1, 5)]
    requests.append((case["query"], greedy))
    batched = run_engine(loaded, requests)
    serial = run_engine(loaded, requests, batched=False)
    assert ["".join(pieces) for pieces, _ in batched] == ["".join(pieces) for pieces, _ in serial]
    assert [done.completion_tokens for _, done in batched] == [4 + 3 * i for i in range(1, 5)] + [12]
    assert "".join(batched[-1][0]) == loaded.tokenizer.decode(case["greedy_12_ids"], skip_special_tokens=True)


def test_a_peft_prefix_adapter_is_served_as_peft_computes_it_batched(converted: Path, tmp_path: Path) -> None:
    """`--method ptuning` trains a peft prefix; ChatGLM-6B positions come from the ids, so its keys serve as
    they are, in the engine's batched path too."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    from llm.loading import load_model
    from llm.prefix import load_prefix, prefix_cache
    from service.engine.types import SamplingParams
    from tests.test_engine_batched import run_engine

    peft_model = get_peft_model(_load(converted), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                     num_virtual_tokens=6)).eval()
    with torch.no_grad():
        embedding = peft_model.prompt_encoder["default"].embedding.weight
        embedding.copy_(torch.randn(embedding.shape, generator=torch.Generator().manual_seed(0)))
    peft_model.save_pretrained(tmp_path / "prefix")
    loaded = load_model(converted, dtype="fp32", device="cpu")
    prefix = load_prefix(tmp_path / "prefix", loaded.model)
    case = golden(FAMILY)["chat"][0]
    ids = torch.tensor([case["prompt_ids"]])
    mask = torch.ones((1, 6 + ids.shape[1]), dtype=torch.long)
    with torch.no_grad():
        served = loaded.model(ids, cache=prefix_cache(prefix), attention_mask=mask).logits[0, -1]
        trained = peft_model(input_ids=ids).logits[0, -1]
    assert torch.allclose(served, trained, atol=1e-4)
    assert _max_diff(served, case["last_logits"]) > 0.1  # the prefix changes the answer

    expected = loaded.model.generate(ids, cache=prefix_cache(prefix), attention_mask=mask, **GREEDY)[0, ids.shape[1]:]
    loaded.prefix = prefix
    greedy = SamplingParams(max_new_tokens=12, min_new_tokens=12, temperature=0.0)
    mixed = run_engine(loaded, [("头痛" * 5, SamplingParams(max_new_tokens=9, temperature=0.0)),
                                (case["query"], greedy)])
    assert "".join(mixed[-1][0]) == loaded.tokenizer.decode(expected.tolist(), skip_special_tokens=True)
