"""The local engine with a tiny GLM: batching, per-request settings, cancellation, failures, loading."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from llm.chat_format import build_prompt_ids, chatglm_prompt
from llm.loading import ModelLoadError, load_model
from llm.tiny_model import build_glm, iter_jsonl_text, local_corpus_files, train_tokenizer
from service.engine.local import LocalEngine
from service.engine.repetition import find_loop
from service.engine.types import (
    ChatTurn,
    Finished,
    GenerationRequest,
    NotSupported,
    PromptTooLong,
    QueueFull,
    SamplingParams,
    TokenDelta,
)

from .engine_fixtures import collect, write_remote_code_model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    train_tokenizer(iter_jsonl_text(local_corpus_files()), root / "tok", vocab_size=1024)
    return {"tok": root / "tok", "glm": build_glm(root / "tok", root / "glm", size="micro", seed=1)}


@pytest.fixture(scope="module")
def engine(model_dirs: dict[str, Path]):
    eng = LocalEngine(load_model(model_dirs["glm"]), max_batch_size=8, max_queue=16, context_tokens=512)
    eng.start()
    yield eng
    eng.stop()


GREEDY = SamplingParams(max_new_tokens=24, min_new_tokens=24, temperature=0.0)


def test_engine_uses_batched_cache_for_native_glm(engine: LocalEngine) -> None:
    assert engine.batched


def test_greedy_alone_equals_greedy_inside_mixed_batch(engine: LocalEngine) -> None:
    async def scenario() -> tuple[str, list[tuple[str, Finished]]]:
        alone, _ = await collect(engine, "孩子发烧三天，咳嗽有痰，怎么办？", GREEDY)
        others = [
            collect(engine, "头痛恶心" * i, SamplingParams(max_new_tokens=10 + 5 * i, temperature=1.2, top_p=0.8,
                                                       top_k=30, repetition_penalty=1.3, seed=i))
            for i in range(1, 6)
        ]
        mixed = await asyncio.gather(*others, collect(engine, "孩子发烧三天，咳嗽有痰，怎么办？", GREEDY))
        return alone, mixed

    alone, mixed = asyncio.run(scenario())
    assert mixed[-1][0] == alone
    assert mixed[-1][1].completion_tokens == 24
    for i, (_, done) in enumerate(mixed[:-1], start=1):
        assert done.finish_reason in ("stop", "length", "repetition")
        assert 1 <= done.completion_tokens <= 10 + 5 * i


def test_seeded_sampling_is_reproducible_alone_and_in_batch(engine: LocalEngine) -> None:
    params = SamplingParams(max_new_tokens=20, min_new_tokens=20, temperature=1.0, top_p=0.95, seed=1234)

    async def scenario() -> tuple[str, str, str]:
        first, _ = await collect(engine, "胃痛怎么办", params)
        second, _ = await collect(engine, "胃痛怎么办", params)
        batch = await asyncio.gather(collect(engine, "胃痛怎么办", params),
                                     collect(engine, "失眠", SamplingParams(max_new_tokens=30, temperature=0.0)))
        return first, second, batch[0][0]

    first, second, in_batch = asyncio.run(scenario())
    assert first == second == in_batch


def test_stop_string_ends_the_answer_before_it(engine: LocalEngine) -> None:
    full, _ = asyncio.run(collect(engine, "高血压能吃党参吗", GREEDY))
    assert len(full) > 6
    stop = full[4:6]
    text, done = asyncio.run(collect(engine, "高血压能吃党参吗", SamplingParams(max_new_tokens=24, temperature=0.0,
                                                                        stop=(stop,))))
    assert done.finish_reason == "stop"
    assert stop not in text and full.startswith(text)


def test_cancelled_stream_frees_its_slot(engine: LocalEngine) -> None:
    async def scenario() -> int:
        request = GenerationRequest(message="咳嗽", params=SamplingParams(max_new_tokens=400, min_new_tokens=400))
        handle = engine.submit(request)
        seen = 0
        async for event in handle:
            if isinstance(event, TokenDelta):
                seen += 1
            if seen >= 3:
                break  # the client went away: leaving the iterator cancels the row
        for _ in range(200):
            if engine.stats()["active"] == 0:
                break
            await asyncio.sleep(0.01)
        return engine.stats()["active"]

    assert asyncio.run(scenario()) == 0


def test_a_failing_request_fails_alone(engine: LocalEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    import service.engine.local as local

    class ExplodingDecoder(local.IncrementalDecoder):
        def push(self, token_id: int) -> str:
            if len(self.ids) >= 3:
                raise RuntimeError("boom")
            return super().push(token_id)

    original = local.IncrementalDecoder
    monkeypatch.setattr(local, "IncrementalDecoder", lambda tok: ExplodingDecoder(tok))

    async def scenario() -> tuple[Finished, Finished]:
        bad = engine.submit(GenerationRequest(message="坏请求", params=GREEDY))
        monkeypatch.setattr(local, "IncrementalDecoder", original)
        good_task = asyncio.ensure_future(collect(engine, "好请求", GREEDY))
        bad_done = [e async for e in bad][-1]
        good_text, good_done = await good_task
        return bad_done, good_done

    bad_done, good_done = asyncio.run(scenario())
    assert bad_done.finish_reason == "error" and bad_done.error
    assert good_done.finish_reason == "length" and good_done.completion_tokens == 24


def test_queue_full_is_refused_at_submit(model_dirs: dict[str, Path]) -> None:
    eng = LocalEngine(load_model(model_dirs["glm"]), max_batch_size=1, max_queue=2)  # not started: nothing drains

    async def scenario() -> None:
        eng.ready = True
        for _ in range(2):
            eng.submit(GenerationRequest(message="x", params=GREEDY))
        with pytest.raises(QueueFull):
            eng.submit(GenerationRequest(message="x", params=GREEDY))

    asyncio.run(scenario())


def test_history_is_trimmed_oldest_first_and_a_huge_message_is_refused(model_dirs: dict[str, Path]) -> None:
    tokenizer = load_model(model_dirs["glm"]).tokenizer
    history = [ChatTurn(f"第{i}个问题" * 3, f"第{i}个回答" * 3) for i in range(10)]
    ids = build_prompt_ids(tokenizer, history, "现在的问题", budget=150)
    text = tokenizer.decode(ids)
    assert len(ids) <= 150 and "现在的问题" in text and "第9个回答" in text and "第0个问题" not in text
    with pytest.raises(PromptTooLong):
        build_prompt_ids(tokenizer, [], "很长的问题" * 200, budget=50)


def test_chatglm_prompt_format() -> None:
    prompt = chatglm_prompt([ChatTurn("你好", "你好，请问哪里不舒服？")], "头痛")
    assert prompt == "[Round 0]\n问：你好\n答：你好，请问哪里不舒服？\n[Round 1]\n问：头痛\n答："


def test_find_loop() -> None:
    assert find_loop([5] * 30) == 1
    assert find_loop(list(range(20)) + [1, 2, 3, 4, 5, 6, 7] * 5) == 7
    assert find_loop(list(range(100))) == 0
    assert find_loop([1, 2] * 5) == 0  # too short to call a loop


def test_repetition_guard_stops_a_looping_answer(engine: LocalEngine) -> None:
    # A penalty below 1 rewards repeating tokens: the model loops, and the guard must end it.
    looping = SamplingParams(max_new_tokens=300, min_new_tokens=300, temperature=0.0, repetition_penalty=0.3)
    _, done = asyncio.run(collect(engine, "咳嗽", looping))
    assert done.finish_reason == "repetition"
    assert done.completion_tokens < 300


def test_adapter_merged_at_load_matches_adapter_logits(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dirs["glm"])
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        fresh = AutoModelForCausalLM.from_pretrained(model_dirs["glm"])
        unmerged = PeftModel.from_pretrained(fresh, tmp_path / "adapter")(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(model_dirs["glm"])(input_ids=ids).logits
        merged = load_model(model_dirs["glm"], adapter_dir=tmp_path / "adapter").model(input_ids=ids).logits
    assert (unmerged - plain).abs().max() > 1e-3  # the adapter really changes the model
    assert torch.allclose(merged, unmerged, atol=1e-4)


def test_quantisation_runs_on_cpu(model_dirs: dict[str, Path]) -> None:
    # More in tests/test_quantization.py (through the real server, the order, unsupported shapes).
    loaded = load_model(model_dirs["glm"], device="cpu", quantization="int4")
    assert loaded.model.doctorglm_quantization == "int4"


def test_remote_code_model_needs_opt_in_then_streams_serially(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    remote = write_remote_code_model(model_dirs["tok"], tmp_path / "remote")
    with pytest.raises(ModelLoadError, match="DOCTORGLM_TRUST_REMOTE_CODE"):
        load_model(remote)
    loaded = load_model(remote, trust_remote_code=True)
    eng = LocalEngine(loaded, max_batch_size=4, context_tokens=256)
    assert not eng.batched  # a legacy tuple cache cannot be spliced: the generic serial path runs
    eng.start()
    try:
        params = SamplingParams(max_new_tokens=12, min_new_tokens=12, temperature=0.0)

        async def scenario() -> list[tuple[str, Finished]]:
            return await asyncio.gather(collect(eng, "头痛", params), collect(eng, "腹泻", params))

        (text_a, done_a), (_, done_b) = asyncio.run(scenario())
        ids = torch.tensor([eng.prepare(GenerationRequest(message="头痛", params=params))])
        # Reference: greedy decoding by full forward passes, no cache at all.
        with torch.no_grad():
            for _ in range(12):
                logits = loaded.model(input_ids=ids).logits[:, -1, :]
                logits[:, sorted(eng.eos_ids)] = float("-inf")
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        expected = loaded.tokenizer.decode(ids[0, -12:], skip_special_tokens=True)
        assert done_a.completion_tokens == done_b.completion_tokens == 12
        assert text_a == expected
        # Echo is refused rather than answered without the prompt (the serial prefill cannot give it).
        with pytest.raises(NotSupported, match="batched path"):
            eng.prepare(GenerationRequest(message="头痛", raw=True,
                                          params=SamplingParams(max_new_tokens=0, prompt_logprobs=True)))
    finally:
        eng.stop()


def test_a_row_reaching_the_position_window_ends_with_length(model_dirs: dict[str, Path]) -> None:
    loaded = load_model(model_dirs["glm"])
    eng = LocalEngine(loaded, max_batch_size=4, context_tokens=4096)
    eng.max_positions = 60  # as if the model's window were 60 positions
    eng.start()
    try:
        params = SamplingParams(max_new_tokens=500, min_new_tokens=500, temperature=0.0)

        async def scenario() -> list[tuple[str, Finished]]:
            return await asyncio.gather(collect(eng, "头痛", params), collect(eng, "腹泻" * 5, params))

        results = asyncio.run(scenario())
    finally:
        eng.stop()
    for _, done in results:
        assert done.finish_reason == "length"
        assert done.prompt_tokens + done.completion_tokens == 60
