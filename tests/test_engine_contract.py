"""Both engine kinds implement the one contract (service/engine/contract.py) that callers type against."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from llm.loading import load_model
from service.engine.contract import Engine, EngineStream
from service.engine.local import LocalEngine
from service.engine.types import GenerationRequest, NotSupported, SamplingParams
from service.engine.upstream import UpstreamEngine


def upstream() -> UpstreamEngine:
    settings = SimpleNamespace(upstream_url="http://127.0.0.1:9", upstream_model="", upstream_api_key=None,
                               upstream_timeout_s=5, max_queue=4, max_batch_size=2)
    return UpstreamEngine(settings)


def test_local_and_upstream_engines_and_their_streams_implement_the_contract(default_model_dir: Path) -> None:
    local = LocalEngine(load_model(default_model_dir), max_batch_size=2, context_tokens=256)
    remote = upstream()
    for engine in (local, remote):
        assert isinstance(engine, Engine)
        engine.start()
    assert local.model_summary()["dtype"] == "float32" and local.model_summary()["quantization"] == "none"
    assert remote.model_summary() == {"dtype": None, "quantization": None}  # the upstream's model is a name

    async def handles() -> list[object]:
        request = GenerationRequest(message="头痛", params=SamplingParams(max_new_tokens=2))
        made = [local.submit(request), remote.submit(request)]
        for handle in made:
            handle.cancel()
        return made

    try:
        for handle in asyncio.run(handles()):
            assert isinstance(handle, EngineStream)
    finally:
        local.stop()
        remote.stop()


def test_upstream_refuses_what_only_the_local_engine_does() -> None:
    remote = upstream()
    with pytest.raises(NotSupported):
        remote.prepare(GenerationRequest(message="x", raw=True))
    with pytest.raises(NotSupported):
        remote.prepare(GenerationRequest(message="x", params=SamplingParams(logprobs=2)))
    assert remote.prepare(GenerationRequest(message="x")) is None
