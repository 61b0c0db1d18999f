"""Real clients against the running server: the official `openai` package and a ChatGLM api.py caller."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.api_support import QUESTION, sse_events


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="any-key-works-when-auth-is-off", timeout=60,
                         max_retries=0)


def test_openai_sync_reads_answer_usage_and_extra_field(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="doctorglm", messages=[{"role": "system", "content": "你是医生"}, {"role": "user", "content": QUESTION}],
        max_tokens=12, temperature=0.5, top_p=0.9, seed=7, stop=["。。。"], n=1, user="ehr-42",
        extra_body={"min_tokens": 12})
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12
    extra = completion.model_extra["doctorglm"]  # references ride in an extra field the client ignores
    assert extra["references"] and extra["safety"]["notice"]
    assert choice.message.content.endswith(extra["safety"]["notice"])


def test_openai_same_seed_same_answer(client: openai.OpenAI) -> None:
    def ask() -> str:
        done = client.chat.completions.create(model="doctorglm", messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=10, seed=123, extra_body={"min_tokens": 10})
        return done.choices[0].message.content or ""

    assert ask() == ask()


def test_openai_stream_reads_chunks_and_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="doctorglm", messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=16, stream=True, stream_options={"include_usage": True},
                                            extra_body={"min_tokens": 16})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["doctorglm"]["references"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    assert len(text) > 10 and "人工智能" in text  # the safety notice is part of the text every client shows


def test_stream_wire_format_ends_with_done(server) -> None:
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == ("message", "[DONE]")
    assert all(name == "message" for name, _ in events)
    assert all(data["object"] == "chat.completion.chunk" for _, data in events[:-1])
    assert "usage" not in events[-2][1]  # usage only with stream_options.include_usage


def test_openai_models_and_errors(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["doctorglm"]
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model="doctorglm", messages=[{"role": "user", "content": "x"}], n=2)
    assert caught.value.body["code"] == "invalid_request"  # the client unwraps {"error": {...}}
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="doctorglm", messages=[{"role": "assistant", "content": "hi"}])


def test_openai_history_becomes_turns(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "我头疼"}, {"role": "assistant", "content": "多久了？"},
                {"role": "user", "content": [{"type": "text", "text": "三天了，还发烧"}]}]
    done = client.chat.completions.create(model="doctorglm", messages=messages, max_tokens=4, temperature=None)
    assert done.choices[0].message.content


def test_chatglm_api_py_request_and_response(server) -> None:
    """The body and fields an integration written for ChatGLM-6B api.py sends and reads."""
    first = httpx.post(server.url + "/chat", json={"prompt": "你好，我咳嗽一周了", "history": [], "max_length": 2048,
                                                   "top_p": 0.7, "temperature": 0.95}, timeout=60)
    assert first.status_code == 200, first.text
    body = first.json()
    assert isinstance(body["response"], str) and body["response"]
    assert body["status"] == 200 and len(body["time"]) == 19  # "YYYY-mm-dd HH:MM:SS"
    assert body["history"] == [["你好，我咳嗽一周了", body["response"]]]
    # The next turn sends the returned history back, as api.py clients do.
    second = httpx.post(server.url + "/chat", json={"prompt": "需要吃药吗？", "history": body["history"],
                                                    "max_length": 2048}, timeout=60)
    assert second.status_code == 200, second.text
    assert [turn[0] for turn in second.json()["history"]] == ["你好，我咳嗽一周了", "需要吃药吗？"]
    # api.py clients sometimes send null history.
    third = httpx.post(server.url + "/chat", json={"prompt": "发烧", "history": None, "max_new_tokens": 2}, timeout=60)
    assert third.status_code == 200, third.text
