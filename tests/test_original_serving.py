"""The real service started on an ORIGINAL ChatGLM-6B / ChatGLM2 / ChatGLM3 directory (no trust_remote_code) converts it
once into its cache, serves it on the batched engine path, answers /chat and streams /chat/stream."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.api_support import QUESTION, sse_events
from tests.conftest import CHATGLM_FAMILIES, original_checkpoint
from tests.server import REPO_ROOT, free_port, start_server

BODY = {"prompt": QUESTION, "temperature": 0, "max_new_tokens": 8}


def _ask_and_stream(url: str) -> None:
    r = httpx.post(url + "/chat", json=BODY, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["status"] == 200 and isinstance(answer["response"], str)
    assert 0 < answer["usage"]["completion_tokens"] <= 8
    with httpx.stream("POST", url + "/chat/stream", json=BODY, timeout=120) as stream:
        assert stream.status_code == 200
        events = sse_events(stream)
    names = [name for name, _ in events]
    assert names[0] == "meta" and names[-1] == "done" and "delta" in names


def _serve_ask_and_stream(cache: Path, logs: Path, env: dict[str, str]) -> str:
    """Start the real server with env, answer /chat and stream /chat/stream, stop it; its log."""
    server = start_server(cache, logs, env)
    try:
        _ask_and_stream(server.url)
    finally:
        server.stop()
    return server.log()


@pytest.mark.parametrize("name", CHATGLM_FAMILIES)
def test_service_serves_an_original_directory(name: str, tmp_path: Path) -> None:
    env = {"DOCTORGLM_MODEL_PATH": str(original_checkpoint(name)), "DOCTORGLM_TRUST_REMOTE_CODE": "false"}
    log = _serve_ask_and_stream(tmp_path / "cache", tmp_path / "logs", env)
    assert "converting the original checkpoint" in log and f"converted {name} in" in log
    assert len([p for p in (tmp_path / "cache" / "converted").iterdir() if p.is_dir()]) == 1


def test_second_start_reuses_the_conversion_and_serves_a_ptuning_prefix(tmp_path: Path) -> None:
    source = original_checkpoint("chatglm3-6b")
    first = start_server(tmp_path / "cache", tmp_path / "logs", {"DOCTORGLM_MODEL_PATH": str(source)})
    first.stop()
    env = {"DOCTORGLM_MODEL_PATH": str(source), "DOCTORGLM_ADAPTER_PATH": str(source / "ptuning")}
    log = _serve_ask_and_stream(tmp_path / "cache", tmp_path / "logs2", env)
    assert "serving the converted copy" in log and "converting the original" not in log
    assert "P-tuning v2 prefix of 8 tokens" in log


@pytest.mark.parametrize("name", CHATGLM_FAMILIES)
def test_original_directory_runs_on_the_batched_engine_path(name: str, tmp_path: Path) -> None:
    from llm.loading import load_model
    from service.engine.local import LocalEngine

    source = original_checkpoint(name)
    for adapter in (None, source / "lora", source / "ptuning"):
        loaded = load_model(source, adapter_dir=adapter, cache_dir=tmp_path)
        assert not (adapter is not None and adapter.name == "ptuning") or loaded.prefix is not None
        assert LocalEngine(loaded, max_batch_size=4).batched


def test_a_failed_conversion_stops_start_up_saying_what_is_wrong(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    source = original_checkpoint("chatglm3-6b")
    for item in ("config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
                 "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(source / item, broken / item)
    env = {**os.environ, "DOCTORGLM_HOST": "127.0.0.1", "DOCTORGLM_PORT": str(free_port()),
           "DOCTORGLM_CACHE_DIR": str(tmp_path / "cache"), "DOCTORGLM_MODEL_PATH": str(broken)}
    proc = subprocess.run([sys.executable, "-m", "service"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "cannot convert the original checkpoint" in output
    assert "pytorch_model-00002-of-00002.bin" in output
    assert not [p for p in (tmp_path / "cache" / "converted").iterdir() if p.is_dir()]


def test_a_config_json_that_is_not_json_is_a_load_error_naming_the_file(tmp_path: Path) -> None:
    from llm.loading import ModelLoadError, load_model

    (tmp_path / "config.json").write_text('{"model_type": "chatglm",', encoding="utf-8")
    with pytest.raises(ModelLoadError, match="config.json cannot be read as JSON"):
        load_model(tmp_path, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("kind", ["lora", "ptuning"])
def test_an_unreadable_adapter_file_is_a_load_error_naming_the_directory(kind: str, tmp_path: Path) -> None:
    from llm.loading import ModelLoadError, load_model

    source = original_checkpoint("chatglm2-6b")
    adapter = tmp_path / kind
    shutil.copytree(source / kind, adapter)
    weights = next(p for p in adapter.iterdir() if p.suffix in (".bin", ".safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ModelLoadError, match=str(adapter)):
        load_model(source, adapter_dir=adapter, cache_dir=tmp_path / "cache")
