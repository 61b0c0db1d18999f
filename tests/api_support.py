"""Helpers for the API tests that talk to the real server: SSE parsing, /proc figures, metrics, models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

QUESTION = "孩子发烧三天，咳嗽有痰，怎么办？"


def sse_events(response: httpx.Response) -> list[tuple[str, Any]]:
    """(event name, data) pairs; a data line that is not JSON (e.g. [DONE]) is kept as a string."""
    events: list[tuple[str, Any]] = []
    name, data = "message", []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            raw = "\n".join(data)
            try:
                events.append((name, json.loads(raw)))
            except json.JSONDecodeError:
                events.append((name, raw))
            name, data = "message", []
    return events


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (kB) and Threads from /proc/<pid>/status."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            found[key] = int(value.split()[0])
    return found


def metric_samples(url: str) -> dict[str, list[Any]]:
    """Samples of /metrics by family name, parsed with prometheus_client's own text parser."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {family.name: list(family.samples) for family in text_string_to_metric_families(text)}


def gauge(url: str, name: str) -> float:
    return float(metric_samples(url)[name][0].value)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_short_window_model(default_model_dir: Path, out_dir: Path, positions: int = 1024) -> Path:
    """A tiny GPT-2 (learned position table of `positions`) with the default model's tokenizer.

    Served with DOCTORGLM_CONTEXT_TOKENS larger than `positions` (an operator mistake the service does
    not detect), a prompt longer than the window makes the model's forward raise IndexError inside the
    engine: a real engine failure for that request only, without any test hook in the service.
    """
    if (out_dir / "config.json").is_file():
        return out_dir
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, out_dir / name)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=8192, n_positions=positions, n_embd=64, n_layer=2, n_head=2,
                        eos_token_id=1, bos_token_id=1, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(out_dir)
    return out_dir
