"""POST /v1/completions with the official `openai` client against the real server, checked against the
model's own forward computed here (greedy tokens, log-probabilities, the prompt's echo)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from llm.loading import load_model
from tests.api_support import QUESTION

PROMPT = "患者：头痛恶心两天，应该怎么办？\n医生："


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused-when-auth-is-off", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def reference(default_model_dir: Path):
    return load_model(default_model_dir)


def greedy_reference(loaded, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy ids and each step's log-softmax, by full forwards (no cache), end-of-text suppressed."""
    eos = loaded.tokenizer.eos_token_id
    ids = list(ids)
    out, dists = [], []
    with torch.no_grad():
        for _ in range(steps):
            logp = torch.log_softmax(loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            dists.append(logp)
            masked = logp.clone()
            masked[eos] = float("-inf")
            token = int(masked.argmax())
            out.append(token)
            ids.append(token)
    return out, dists


def test_greedy_text_and_logprobs_match_the_model(client: openai.OpenAI, reference) -> None:
    done = client.completions.create(model="doctorglm", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3,
                                     extra_body={"min_tokens": 8})
    ids = reference.tokenizer(PROMPT)["input_ids"]
    expected, dists = greedy_reference(reference, ids, 8)
    choice = done.choices[0]
    assert done.object == "text_completion" and choice.finish_reason == "length"
    assert choice.text == reference.tokenizer.decode(expected, skip_special_tokens=True)
    assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens == 8
    lp = choice.logprobs
    assert len(lp.token_logprobs) == 8 and len(lp.top_logprobs) == 8
    for step, (token, dist) in enumerate(zip(expected, dists, strict=True)):
        assert lp.token_logprobs[step] == pytest.approx(float(dist[token]), abs=1e-4)
        top = lp.top_logprobs[step]
        assert len(top) <= 3 and max(top.values()) == pytest.approx(float(dist.max()), abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_echo_returns_the_prompt_with_its_own_logprobs(client: openai.OpenAI, reference) -> None:
    done = client.completions.create(model="doctorglm", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    ids = reference.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(reference.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    choice = done.choices[0]
    assert choice.text == PROMPT
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(logp[i - 1, ids[i]]), abs=1e-4)
    assert done.usage.completion_tokens == 0


def test_token_id_prompts_and_several_prompts_give_one_choice_each(client: openai.OpenAI, reference) -> None:
    ids = reference.tokenizer(PROMPT)["input_ids"]
    by_text = client.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0,
                                        extra_body={"min_tokens": 6})
    by_ids = client.completions.create(model="m", prompt=ids, max_tokens=6, temperature=0,
                                       extra_body={"min_tokens": 6})
    assert by_ids.choices[0].text == by_text.choices[0].text
    both = client.completions.create(model="m", prompt=[PROMPT, "咳嗽有痰"], max_tokens=6, temperature=0,
                                      extra_body={"min_tokens": 6})
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == by_text.choices[0].text
    assert both.usage.completion_tokens == 12


def test_streaming_gives_the_same_text_and_usage(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="m", prompt=PROMPT, max_tokens=10, temperature=0,
                                      extra_body={"min_tokens": 10})
    chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            logprobs=0, stream_options={"include_usage": True},
                                            extra_body={"min_tokens": 10}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices and c.choices[0].logprobs) == 10
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


def test_no_brief_and_no_safety_text_on_raw_completions(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}], max_tokens=4)
    notice = chat.model_extra["doctorglm"]["safety"]["notice"]
    raw = client.completions.create(model="m", prompt=QUESTION, max_tokens=4, temperature=0,
                                    extra_body={"min_tokens": 4})
    assert notice and notice not in raw.choices[0].text
    assert raw.usage.completion_tokens == 4 and "doctorglm" not in (raw.model_extra or {})
    assert raw.usage.prompt_tokens < chat.usage.prompt_tokens  # no disease brief, no chat template


@pytest.mark.parametrize("body, param", [
    ({"prompt": PROMPT, "n": 2}, "n"),
    ({"prompt": PROMPT, "logprobs": 21}, "logprobs"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [10 ** 9]}, "prompt"),
    ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
])
def test_bad_requests_are_clear_4xx(server, body: dict, param: str) -> None:
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] and error["message"]


def test_completions_need_a_key_when_keys_are_on(cache_dir: Path, default_model_dir: Path, tmp_path: Path) -> None:
    from tests.server import start_server

    running = start_server(cache_dir, tmp_path, {"DOCTORGLM_API_KEYS": "k-completions-1"})
    try:
        body = {"prompt": PROMPT, "max_tokens": 2}
        refused = httpx.post(running.url + "/v1/completions", json=body, timeout=30)
        keyed = httpx.post(running.url + "/v1/completions", json=body, timeout=60,
                           headers={"Authorization": "Bearer k-completions-1"})
    finally:
        running.stop()
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert keyed.status_code == 200 and keyed.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.fixture(scope="module")
def unguarded(cache_dir: Path, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Long answers that do not stop early: no repetition guard, room for 1000 tokens."""
    from tests.server import start_server

    running = start_server(cache_dir, tmp_path_factory.mktemp("unguarded"), {
        "DOCTORGLM_MAX_NEW_TOKENS": "1024", "DOCTORGLM_CONTEXT_TOKENS": "2048", "DOCTORGLM_REPETITION_GUARD": "0"})
    yield running
    running.stop()


def engine_busy_after(url: str, seconds: float = 2.0) -> float:
    """Rows generating + requests queued, once they reach 0 or after `seconds`."""
    from tests.api_support import metric_samples

    deadline, busy = time.monotonic() + seconds, 1.0
    while time.monotonic() < deadline:
        samples = metric_samples(url)
        busy = samples["doctorglm_active_streams"][0].value + samples["doctorglm_queued_requests"][0].value
        if busy == 0:
            break
        time.sleep(0.05)
    return busy


def test_the_answer_limit_holds_and_a_refused_prompt_frees_the_ones_queued_before_it(unguarded) -> None:
    over = httpx.post(unguarded.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 1025}, timeout=30)
    assert over.status_code == 422 and "1024" in over.json()["error"]["message"]
    # Fifteen short prompts queue, then the last one is over the budget (2048 - 1000 tokens).
    prompts = [[5, 6, 7]] * 15 + [[5] * 1049]
    refused = httpx.post(unguarded.url + "/v1/completions", timeout=60,
                         json={"prompt": prompts, "max_tokens": 1000, "min_tokens": 1000, "temperature": 0})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "prompt_too_long"
    assert engine_busy_after(unguarded.url) == 0  # the fifteen were cancelled, not left generating 1000 tokens


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": [[5, 6, 7]] * 16, "max_tokens": 1000, "min_tokens": 1000, "temperature": 0}),
    ("/chat", {"prompt": "头痛", "max_new_tokens": 1000, "min_new_tokens": 1000, "temperature": 0}),
])
def test_a_client_that_leaves_a_non_streamed_answer_frees_its_rows(unguarded, path: str, body: dict) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(unguarded.url + path, json=body, timeout=httpx.Timeout(30, read=0.5))
    assert engine_busy_after(unguarded.url) == 0  # noticed within the poll, not after 16 x 1000 tokens
