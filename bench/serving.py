"""Serving benchmark (issue: engine). One run, one small model throughout; ratios against baselines
measured in the same run. Writes bench/results/serving.json and bench/results/serving.png.

    python bench/serving.py [--tokens 128] [--clients 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llm.chat_format import render  # noqa: E402
from llm.loading import load_model  # noqa: E402
from llm.tiny_model import ensure_default_model  # noqa: E402
from tests.server import start_server  # noqa: E402

QUESTION = "孩子发烧三天，咳嗽有痰，怎么办？"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def raw_generate(model_dir: Path, tokens: int, repeats: int) -> dict[str, float]:
    """Baseline: transformers' own generate() streaming (TextIteratorStreamer), batch 1, greedy."""
    import torch
    from transformers import TextIteratorStreamer

    loaded = load_model(model_dir)
    ids = torch.tensor([render(loaded.tokenizer, [], QUESTION)])
    rates, prefills = [], []
    with torch.inference_mode():
        loaded.model.generate(input_ids=ids, max_new_tokens=4, pad_token_id=loaded.tokenizer.pad_token_id)  # warm-up
        for _ in range(7):
            started = time.perf_counter()
            loaded.model(input_ids=ids, logits_to_keep=1)
            prefills.append(time.perf_counter() - started)
    for _ in range(repeats):
        streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                      min_new_tokens=tokens, do_sample=False, streamer=streamer,
                      pad_token_id=loaded.tokenizer.pad_token_id)
        started = time.perf_counter()
        worker = threading.Thread(target=loaded.model.generate, kwargs=kwargs)
        worker.start()
        for _ in streamer:
            pass
        worker.join()
        rates.append(tokens / (time.perf_counter() - started))
    return {"tokens_per_s": statistics.median(rates), "prefill_ms": statistics.median(prefills) * 1000,
            "prompt_tokens": ids.shape[1]}


async def one_stream(client: httpx.AsyncClient, url: str, tokens: int) -> dict[str, float]:
    body = {"prompt": QUESTION, "max_new_tokens": tokens, "min_new_tokens": tokens, "temperature": 0,
            "use_knowledge": False, "repetition_penalty": 1.0}
    started = time.perf_counter()
    first = None
    completion = 0
    async with client.stream("POST", url + "/chat/stream", json=body) as response:
        response.raise_for_status()
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "delta" and first is None:
                first = time.perf_counter()
            elif line.startswith("data:") and event == "done":
                completion = json.loads(line[5:])["usage"]["completion_tokens"]
    ended = time.perf_counter()
    return {"ttft_ms": ((first or ended) - started) * 1000, "seconds": ended - started, "tokens": completion}


async def service_runs(url: str, tokens: int, repeats: int, clients: int) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=300) as client:
        await one_stream(client, url, 8)  # warm-up
        single = [await one_stream(client, url, tokens) for _ in range(repeats)]
        started = time.perf_counter()
        sequential = [await one_stream(client, url, tokens) for _ in range(clients)]
        sequential_s = time.perf_counter() - started
        started = time.perf_counter()
        concurrent = await asyncio.gather(*[one_stream(client, url, tokens) for _ in range(clients)])
        concurrent_s = time.perf_counter() - started
    return {
        "single_tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in single),
        "single_ttft_ms": statistics.median(r["ttft_ms"] for r in single),
        "sequential_tokens_per_s": sum(r["tokens"] for r in sequential) / sequential_s,
        "concurrent_tokens_per_s": sum(r["tokens"] for r in concurrent) / concurrent_s,
        "concurrent_ttft_p50_ms": pct([r["ttft_ms"] for r in concurrent], 50),
        "concurrent_ttft_p99_ms": pct([r["ttft_ms"] for r in concurrent], 99),
    }


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def plot(results: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["generate()\nstreaming", "service SSE\nbatch 1", "service\n8 sequential", "service\n8 concurrent"]
    values = [results["raw_generate"]["tokens_per_s"], results["service"]["single_tokens_per_s"],
              results["service"]["sequential_tokens_per_s"], results["service"]["concurrent_tokens_per_s"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar(labels, values, color=["#888", "#4a7", "#48a", "#e83"])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"Serving throughput, {results['model']} on {os.cpu_count()} CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cache = ROOT / ".cache" / "bench"
    model_dir = ensure_default_model(cache)
    print(f"model: {model_dir.name} ({args.tokens} tokens per answer, greedy, min_new_tokens = max_new_tokens)")
    raw = raw_generate(model_dir, args.tokens, args.repeats)
    server = start_server(cache, cache / "logs", {"DOCTORGLM_MAX_BATCH_SIZE": str(args.clients)})
    try:
        svc = asyncio.run(service_runs(server.url, args.tokens, args.repeats, args.clients))
        rss = peak_rss_mb(server.proc.pid)
    finally:
        server.stop()
    results = {
        "model": model_dir.name, "tokens": args.tokens, "clients": args.clients, "raw_generate": raw,
        "service": svc, "peak_rss_mb": rss,
        "ratios": {
            "sse_vs_generate": svc["single_tokens_per_s"] / raw["tokens_per_s"],
            "ttft_minus_prefill_ms": svc["single_ttft_ms"] - raw["prefill_ms"],
            "concurrent_vs_sequential": svc["concurrent_tokens_per_s"] / svc["sequential_tokens_per_s"],
        },
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "serving.png")
    r = results["ratios"]
    print(f"{'measure':44} {'value':>10} {'goal':>14}")
    print(f"{'generate() streaming, batch 1 (tok/s)':44} {raw['tokens_per_s']:10.1f}")
    print(f"{'service SSE, batch 1 (tok/s)':44} {svc['single_tokens_per_s']:10.1f}")
    print(f"{'  ratio SSE / generate':44} {r['sse_vs_generate']:10.2f}x {'>= 0.95x':>14}")
    print(f"{'prefill (ms, model forward on the prompt)':44} {raw['prefill_ms']:10.1f}")
    print(f"{'time to first delta over HTTP (ms)':44} {svc['single_ttft_ms']:10.1f}")
    print(f"{'  TTFT - prefill (ms)':44} {r['ttft_minus_prefill_ms']:10.1f} {'<= 20 ms':>14}")
    print(f"{'8 sequential requests (aggregate tok/s)':44} {svc['sequential_tokens_per_s']:10.1f}")
    print(f"{'8 concurrent clients (aggregate tok/s)':44} {svc['concurrent_tokens_per_s']:10.1f}")
    print(f"{'  ratio concurrent / sequential':44} {r['concurrent_vs_sequential']:10.2f}x {'>= 4x':>14}")
    print(f"{'  TTFT under load p50 / p99 (ms)':44} {svc['concurrent_ttft_p50_ms']:6.0f} / "
          f"{svc['concurrent_ttft_p99_ms']:.0f}")
    print(f"{'peak RSS of the server (MB)':44} {rss:10.0f}")
    print(f"wrote {out / 'serving.json'} and {out / 'serving.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
