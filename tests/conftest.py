"""Shared fixtures. Tests that need ../shared/data skip cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("DOCTORGLM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
# Tiny ChatGLM-6B / 2 / 3 checkpoints in THUDM's original layouts, with golden.json (what their own code computed).
SHARED_CHATGLM = SHARED_DATA.parent / "models" / "chatglm"
CHATGLM_FAMILIES = ("chatglm-6b", "chatglm2-6b", "chatglm3-6b")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The public data folder (../shared/data); skips the test when it is not there."""
    if not (SHARED_DATA / "diseases.jsonl").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def original_checkpoint(name: str) -> Path:
    """One of the original-layout fixtures (chatglm-6b, chatglm2-6b, chatglm3-6b); skips when absent."""
    folder = SHARED_CHATGLM / name
    if not (folder / "golden.json").is_file():
        pytest.skip(f"original ChatGLM fixtures not found at {SHARED_CHATGLM}")
    return folder


def golden(name: str) -> dict:
    """What the checkpoint's own code computed (tokenize, chat, decode, lora, ptuning)."""
    import json

    return json.loads((original_checkpoint(name) / "golden.json").read_text(encoding="utf-8"))


CACHE_DIR = REPO_ROOT / ".cache" / "tests"


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """A cache shared by the test session (and reused by later local runs): model + indexes."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return CACHE_DIR


@pytest.fixture(scope="session")
def default_model_dir(cache_dir: Path) -> Path:
    """The embedded default model (tiny GLM + tokenizer trained on the project's text)."""
    from llm.tiny_model import ensure_default_model

    return ensure_default_model(cache_dir, progress=False)


@pytest.fixture(scope="session")
def server(cache_dir: Path, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real server for the read-mostly API tests."""
    from tests.server import start_server

    logs = tmp_path_factory.mktemp("server")
    running = start_server(cache_dir, logs, {"DOCTORGLM_AUDIT_LOG": str(logs / "audit.jsonl")})
    running.audit_path = logs / "audit.jsonl"  # type: ignore[attr-defined]
    yield running
    running.stop()
