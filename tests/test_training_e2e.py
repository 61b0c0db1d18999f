"""End to end: micro GLM → LoRA a few steps → adapter → merge → the real service answers on it, and the
service on base + DOCTORGLM_ADAPTER_PATH gives the same greedy answer as on the merged directory."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from training.config import TrainConfig
from training.data import load_examples
from training.merge import merge
from training.trainer import Trainer

QUESTION = "医生，我这两天头痛，还有点发烧，怎么办？"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from llm.paths import REPO_ROOT
    from llm.tiny_model import build_glm, iter_jsonl_text, local_corpus_files, train_tokenizer

    root = tmp_path_factory.mktemp("e2e")
    train_tokenizer(iter_jsonl_text(local_corpus_files()), root / "tok", vocab_size=1200)
    base = build_glm(root / "tok", root / "base", size="micro")
    examples = load_examples(REPO_ROOT / "knowledge" / "data" / "sample_dialogues.jsonl")[:40]
    cfg = TrainConfig(lr=1e-3, max_steps=6, eval_every=3, batch_size=4, max_len=160, max_target=48,
                      probe_max_new_tokens=4, with_brief=0.5, stop_on_collapse=False)
    result = Trainer(cfg, base, root / "run", progress=False).run(examples[:32], examples[32:])
    assert result.steps == 6 and result.best_dir is not None
    merged = merge(result.best_dir, root / "merged")
    return {"base": base, "adapter": result.best_dir, "merged": merged, "root": root}


def _greedy(server_url: str) -> dict:
    r = httpx.post(server_url + "/chat", json={"prompt": QUESTION, "temperature": 0, "max_new_tokens": 16,
                                               "min_new_tokens": 16}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_service_serves_merged_model_and_adapter_gives_the_same_answer(trained: dict[str, Path],
                                                                        cache_dir: Path) -> None:
    from tests.server import start_server

    logs = trained["root"] / "logs"
    merged_server = start_server(cache_dir, logs, {"DOCTORGLM_MODEL_PATH": str(trained["merged"])})
    try:
        merged_body = _greedy(merged_server.url)
    finally:
        merged_server.stop()
    assert merged_body["status"] == 200 and merged_body["response"].strip()
    assert merged_body["usage"]["completion_tokens"] == 16
    adapter_server = start_server(cache_dir, logs, {"DOCTORGLM_MODEL_PATH": str(trained["base"]),
                                                    "DOCTORGLM_ADAPTER_PATH": str(trained["adapter"])})
    try:
        adapter_body = _greedy(adapter_server.url)
    finally:
        adapter_server.stop()
    assert adapter_body["response"] == merged_body["response"]
