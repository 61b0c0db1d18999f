"""The batched path against reference forwards: P-tuning v2 prefixes, per-family position schemes,
and the repetition penalty on the batched and the serial path."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from llm.chat_format import ChatTurn
from llm.loading import LoadedModel, load_model
from llm.tiny_model import build_glm, iter_jsonl_text, local_corpus_files, train_tokenizer
from service.engine.local import LocalEngine, StreamHandle
from service.engine.types import Finished, GenerationRequest, SamplingParams, TokenDelta

QUESTION = "孩子发烧三天，咳嗽有痰，怎么办？"
STEPS = 16
GREEDY = SamplingParams(max_new_tokens=STEPS, min_new_tokens=STEPS, temperature=0.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    train_tokenizer(iter_jsonl_text(local_corpus_files()), root / "tok", vocab_size=1024)
    return build_glm(root / "tok", root / "glm", size="micro", seed=3)


def random_prefix(loaded: LoadedModel, length: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    config = loaded.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (1, config.num_key_value_heads, length, head_dim)
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
            for _ in range(config.num_hidden_layers)]


def run_engine(loaded: LoadedModel, requests: list[tuple[str, SamplingParams]], *, batched: bool = True,
               scheme: object | None = None) -> list[tuple[list[str], Finished]]:
    eng = LocalEngine(loaded, max_batch_size=8, context_tokens=512)
    eng.batched = eng.batched and batched
    if scheme is not None:
        eng.positions = scheme  # type: ignore[assignment]
    eng.start()

    async def one(message: str, params: SamplingParams) -> tuple[list[str], Finished]:
        pieces: list[str] = []
        done = None
        async for event in eng.stream(GenerationRequest(message=message, params=params)):
            if isinstance(event, TokenDelta):
                pieces.append(event.text)
            else:
                done = event
        assert done is not None
        return pieces, done

    async def all_of() -> list[tuple[list[str], Finished]]:
        return list(await asyncio.gather(*(one(m, p) for m, p in requests)))

    try:
        return asyncio.run(all_of())
    finally:
        eng.stop()


def reference_greedy(loaded: LoadedModel, prompt_ids: list[int], prefix: list | None, steps: int,
                     eos: set[int]) -> str:
    """Greedy decoding by the model's own forward: a DynamicCache pre-filled with the prefix, positions from 0."""
    from transformers import DynamicCache

    model = loaded.model
    cache = DynamicCache(ddp_cache_data=prefix) if prefix else DynamicCache()
    p = prefix[0][0].shape[2] if prefix else 0
    ids = list(prompt_ids)
    new: list[int] = []
    step_ids = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            start = len(ids) - step_ids.shape[1]
            out = model(input_ids=step_ids, cache=cache, use_cache=True,
                        attention_mask=torch.ones((1, p + len(ids)), dtype=torch.long),
                        position_ids=torch.arange(start, len(ids))[None, :])
            cache = out.past_key_values if getattr(out, "cache", None) is None else out.cache
            logits = out.logits[0, -1].clone()
            logits[sorted(eos)] = float("-inf")
            token = int(logits.argmax())
            new.append(token)
            ids.append(token)
            step_ids = torch.tensor([[token]])
    return loaded.tokenizer.decode(new, skip_special_tokens=True)


MIXED = [("头痛恶心" * i, SamplingParams(max_new_tokens=6 + 4 * i, temperature=1.1, top_p=0.8, top_k=20,
                                      repetition_penalty=1.2, seed=i)) for i in range(1, 5)]


def test_prefix_rows_match_the_reference_alone_and_in_a_mixed_batch(model_dir: Path) -> None:
    loaded = load_model(model_dir)
    loaded.prefix = random_prefix(loaded, length=5)
    eng = LocalEngine(loaded, context_tokens=512)
    prompt_ids = eng.prepare(GenerationRequest(message=QUESTION, params=GREEDY))
    expected = reference_greedy(loaded, prompt_ids, loaded.prefix, STEPS, eng.eos_ids)
    without_prefix = reference_greedy(loaded, prompt_ids, None, STEPS, eng.eos_ids)
    assert expected != without_prefix  # the prefix really changes the answer

    (alone, done), = run_engine(loaded, [(QUESTION, GREEDY)])
    assert "".join(alone) == expected and done.completion_tokens == STEPS
    mixed = run_engine(loaded, [*MIXED, (QUESTION, GREEDY)])
    assert "".join(mixed[-1][0]) == expected


def test_without_prefix_the_engine_matches_the_reference(model_dir: Path) -> None:
    loaded = load_model(model_dir)
    eng = LocalEngine(loaded, context_tokens=512)
    prompt_ids = eng.prepare(GenerationRequest(message=QUESTION, params=GREEDY))
    expected = reference_greedy(loaded, prompt_ids, None, STEPS, eng.eos_ids)
    mixed = run_engine(loaded, [*MIXED, (QUESTION, GREEDY)])
    assert "".join(mixed[-1][0]) == expected


class TwoColumnLinear:
    """A 2-D position state (position, block) whose input is its first column: the engine must carry a
    (B, 2) state through joins, leaves and steps without knowing its shape."""

    def prefill(self, prompt_ids: list[int], device: torch.device) -> torch.Tensor | None:
        return torch.arange(len(prompt_ids), device=device)[None, :]

    def first(self, prompt_ids: list[int], device: torch.device) -> torch.Tensor:
        return torch.tensor([[len(prompt_ids), 1]], device=device)

    def as_input(self, state: torch.Tensor) -> torch.Tensor:
        return state[:, :1]

    def advance(self, state: torch.Tensor) -> torch.Tensor:
        return state + torch.tensor([1, 1], device=state.device)


class StretchedPositions(TwoColumnLinear):
    """Positions 0, 3, 6, ... (rotary attention sees only distances, so a shift would change nothing):
    a scheme the engine really uses changes the output."""

    def prefill(self, prompt_ids: list[int], device: torch.device) -> torch.Tensor | None:
        return 3 * torch.arange(len(prompt_ids), device=device)[None, :]

    def as_input(self, state: torch.Tensor) -> torch.Tensor:
        return 3 * state[:, :1]


def test_a_two_dimensional_position_state_runs_through_the_batch(model_dir: Path) -> None:
    loaded = load_model(model_dir)
    plain = run_engine(loaded, [*MIXED, (QUESTION, GREEDY)])
    two_d = run_engine(loaded, [*MIXED, (QUESTION, GREEDY)], scheme=TwoColumnLinear())
    shifted = run_engine(loaded, [(QUESTION, GREEDY)], scheme=StretchedPositions())
    assert "".join(two_d[-1][0]) == "".join(plain[-1][0])
    assert [d.completion_tokens for _, d in two_d] == [d.completion_tokens for _, d in plain]
    assert "".join(shifted[0][0]) != "".join(plain[-1][0])


@pytest.mark.parametrize("penalty", [1.3, 0.3])
def test_batched_and_serial_paths_apply_the_same_repetition_penalty(model_dir: Path, penalty: float) -> None:
    # 0.3 rewards repeats, so the second token already shows whether the prefill's token was counted as seen.
    loaded = load_model(model_dir)
    penalised = SamplingParams(max_new_tokens=40, min_new_tokens=40, temperature=0.0, repetition_penalty=penalty)
    unpenalised = SamplingParams(max_new_tokens=40, min_new_tokens=40, temperature=0.0)
    questions = [QUESTION, "头痛恶心两天", "胃痛怎么办"]
    batched = run_engine(loaded, [(q, penalised) for q in questions])
    serial = run_engine(loaded, [(q, penalised) for q in questions], batched=False)
    plain = run_engine(loaded, [(q, unpenalised) for q in questions])
    assert ["".join(t) for t, _ in batched] == ["".join(t) for t, _ in serial]
    assert ["".join(t) for t, _ in batched] != ["".join(t) for t, _ in plain]  # the penalty is in force


def test_rows_joining_leaving_and_outgrowing_the_cache_match_the_reference(model_dir: Path) -> None:
    """Grouped prefills, a queue behind a full batch, a long prompt joining short running rows (the batch
    moves right), rows leaving mid-batch, and answers longer than the first cache allocation."""
    loaded = load_model(model_dir)
    eng = LocalEngine(loaded, max_batch_size=3, context_tokens=1024, repetition_guard=False)
    cases = [("头痛", 300), ("腹泻三天" * 2, 9), ("胃痛怎么办", 40), ("失眠多梦" * 3, 120), ("咳嗽", 5),
             ("孩子发烧三天，咳嗽有痰，怎么办？" * 12, 30), ("皮疹", 70)]
    eng.start()

    async def one(message: str, steps: int, started: asyncio.Event | None = None) -> str:
        params = SamplingParams(max_new_tokens=steps, min_new_tokens=steps, temperature=0.0)
        text, seen = "", 0
        async for event in eng.stream(GenerationRequest(message=message, params=params)):
            if isinstance(event, TokenDelta):
                text += event.text
                seen += 1
                if started is not None and seen >= 5:
                    started.set()
            else:
                assert event.completion_tokens == steps
        return text

    async def scenario() -> list[str]:
        started = asyncio.Event()
        first = [asyncio.ensure_future(one(*cases[0], started)), asyncio.ensure_future(one(*cases[1]))]
        await started.wait()  # the long prompt joins rows that are already decoding
        rest = [asyncio.ensure_future(one(m, s)) for m, s in cases[2:]]
        return list(await asyncio.gather(*first, *rest))

    try:
        texts = asyncio.run(scenario())
    finally:
        eng.stop()
    for (message, steps), text in zip(cases, texts, strict=True):
        prompt_ids = eng.prepare(GenerationRequest(message=message, params=SamplingParams(max_new_tokens=steps)))
        assert text == reference_greedy(loaded, prompt_ids, None, steps, eng.eos_ids), message


# A designed prompt: a long shared beginning (the knowledge brief) and a different question at the end.
BRIEF = ("以下是与患者描述可能相关的疾病资料：上呼吸道感染，常见症状为发热、咳嗽、流涕、咽痛，"
         "多由病毒引起，注意休息、多饮水。") * 3


def test_prompts_reusing_a_cached_beginning_match_the_reference(model_dir: Path) -> None:
    """Rows that start with a cached prompt prefix prefill only the rest, alone and in one padded group, and
    compute what a full prefill computes. This model's random weights barely use positions (positions that
    restart at 0 after the cached part give the same greedy text), so the log-probabilities are compared:
    that tolerance is what guards the positions."""
    loaded = load_model(model_dir)
    questions = [BRIEF + q for q in ("孩子发烧三天", "咳嗽有痰怎么办，晚上咳得厉害", "头痛", "嗓子疼两天了还有点低烧")]
    scored = SamplingParams(max_new_tokens=STEPS, min_new_tokens=STEPS, temperature=0.0, logprobs=0)

    def request(question: str) -> GenerationRequest:
        return GenerationRequest(message=question, params=scored, shared_prefix=BRIEF)

    def run(eng: LocalEngine) -> list[tuple[str, list[float], int]]:
        async def one(handle: StreamHandle) -> tuple[str, list[float], int]:
            text, logprobs, prompt_tokens = "", [], 0
            async for event in handle:
                if isinstance(event, TokenDelta):
                    text += event.text
                    logprobs += [t.logprob for t in event.logprobs]
                else:
                    prompt_tokens = event.prompt_tokens
            return text, logprobs, prompt_tokens

        async def scenario() -> list[tuple[str, list[float], int]]:
            first = await one(eng.submit(request(questions[0])))  # fills the cache
            with eng._cv:  # the worker cannot take any of the three before all are queued: one group
                handles = [eng.submit(request(q)) for q in questions[1:]]
            return [first, *await asyncio.gather(*(one(h) for h in handles))]

        eng.start()
        try:
            return asyncio.run(scenario())
        finally:
            eng.stop()

    cached_engine = LocalEngine(loaded, max_batch_size=8, context_tokens=1024, prompt_cache_mb=16)
    cached = run(cached_engine)
    full = run(LocalEngine(loaded, max_batch_size=8, context_tokens=1024, prompt_cache_mb=0))
    assert cached_engine.timings.prefills == 2  # the first alone, then the other three together
    assert cached_engine.prompt_cache is not None and len(cached_engine.prompt_cache) >= 3
    assert cached_engine.stats()["prompt_cache_reused_tokens"] >= 3 * 3 * 32
    assert [(text, tokens) for text, _, tokens in cached] == [(text, tokens) for text, _, tokens in full]
    assert max(abs(a - b) for (_, x, _), (_, y, _) in zip(cached, full, strict=True)
               for a, b in zip(x, y, strict=True)) < 1e-4
    prompt_ids = cached_engine.prepare(GenerationRequest(message=questions[2], params=GREEDY))
    assert cached[2][0] == reference_greedy(loaded, prompt_ids, None, STEPS, cached_engine.eos_ids)


def test_the_prompt_cache_keeps_no_patient_text(model_dir: Path) -> None:
    """Only the shared beginning (template and brief) is kept: never the question, never a conversation's
    history, nothing of a request that names no shared beginning."""
    loaded = load_model(model_dir)
    eng = LocalEngine(loaded, max_batch_size=8, context_tokens=1024, prompt_cache_mb=16)
    question = BRIEF + "我最近" + "头痛恶心，晚上睡不着" * 8  # the patient's words: far more than a block
    shared = GenerationRequest(message=question, params=GREEDY, shared_prefix=BRIEF)
    ids = eng.prepare(shared)
    limit = eng._cacheable_tokens(shared, ids)
    brief_ids = eng.prepare(GenerationRequest(message=BRIEF, params=GREEDY))
    assert 32 <= limit < len(brief_ids) <= len(ids) - 32
    assert eng._cacheable_tokens(GenerationRequest(message=question, params=GREEDY), ids) == 0
    history = GenerationRequest(message=question, params=GREEDY, shared_prefix=BRIEF,
                                history=[ChatTurn("我头痛", "请问多久了？")])
    assert eng._cacheable_tokens(history, eng.prepare(history)) == 0

    async def go() -> None:
        for request in (shared, GenerationRequest(message=question, params=GREEDY)):
            async for _ in eng.stream(request):
                pass

    eng.start()
    try:
        asyncio.run(go())
    finally:
        eng.stop()
    assert eng.prompt_cache is not None and 0 < len(eng.prompt_cache) * 32 <= limit


def test_no_prompt_cache_where_a_prefix_depends_on_what_follows(model_dir: Path) -> None:
    loaded = load_model(model_dir)
    assert LocalEngine(loaded, prompt_cache_mb=16).prompt_cache is not None
    assert LocalEngine(loaded, prompt_cache_mb=0).prompt_cache is None

    class BothWays(TwoColumnLinear):
        prompt_prefix_reusable = False

        def __init__(self, config: object) -> None:
            pass

    model_class = type(loaded.model)
    model_class.position_scheme = BothWays  # as ChatGLM-6B's class declares its prefix-LM positions
    try:
        assert LocalEngine(loaded, prompt_cache_mb=16).prompt_cache is None
    finally:
        del model_class.position_scheme
    loaded.prefix = random_prefix(loaded, length=5)  # a P-tuning prefix sits before every prompt
    assert LocalEngine(loaded, prompt_cache_mb=16).prompt_cache is None
