"""Serving benchmark under realistic load (issue 14), as vLLM's benchmark_serving does it.

One run, one server, ratios against baselines measured in the same run:

- workload: real patient questions with the answer lengths of ../shared/data/dialogues (each answer's token
  count under the served tokenizer, capped by --max-tokens; min_new_tokens = that count, because the embedded
  model's random weights would otherwise end at random). Without ../shared, the project's sample dialogues.
  Requests go through HTTP/SSE (/chat/stream) with the prompt designer on, as a clinician's page sends them.
- one server with DOCTORGLM_MAX_BATCH_SIZE --max-batch (16: Poisson arrivals burst above their mean, and a row
  that waits for a free slot waits for a whole answer); the prompt cache on, as by default.
- one at a time (sequential, before and after the rest: the baseline is their mean, because the machine is
  shared and its load drifts), a closed loop of --clients clients, then open-loop Poisson arrivals at several
  rates up to saturation (fractions of the closed loop's request rate), --requests requests per rate:
  output tokens/s, requests/s, TTFT p50/p99 and inter-token latency (gap between SSE deltas) p50/p99; then the
  same closed loop on a server without the prompt cache.
- a peer: transformers' own continuous batching (ContinuousBatchingManager) on the same model and requests,
  all at once, in process (no HTTP), against our engine in process on the same requests (batch 8, and as
  many rows as requests, which is what the manager runs).
- a decode step by part (cache, forward, sample, tokens, deliver) at batch 1 and batch 8, in process, with the
  linear layers packed for oneDNN as the engine runs them on CPU (llm/cpu_linear.py) and as loaded (nn.Linear);
  batch 1 and batch 8 run back to back, and the ratio is the median of ten such pairs (the machine drifts).
- issue 13's row: a converted ChatGLM3 fixture (python -m training convert) served, 8 clients vs one at a time.

Writes bench/results/serving.json and bench/results/serving.png.

    python bench/serving.py [--requests 64] [--clients 8] [--max-batch 16] [--max-tokens 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llm.tiny_model import ensure_default_model, iter_jsonl_records  # noqa: E402
from tests.server import start_server  # noqa: E402

SHARED = ROOT.parent / "shared"
DIALOGUES = SHARED / "data" / "dialogues"
CHATGLM3 = SHARED / "models" / "chatglm" / "chatglm3-6b"


@dataclasses.dataclass(frozen=True)
class Request:
    question: str
    tokens: int  # the answer's length in tokens: generated exactly (min = max)


def workload(tokenizer: Any, count: int, cap: int, seed: int = 0) -> tuple[list[Request], str]:
    """Questions with their real answers' token counts, shuffled with a fixed seed."""
    files = sorted(DIALOGUES.glob("*.jsonl")) if DIALOGUES.is_dir() else []
    source = "../shared/data/dialogues" if files else "knowledge/data/sample_dialogues.jsonl"
    files = files or [ROOT / "knowledge" / "data" / "sample_dialogues.jsonl"]
    pairs: list[tuple[str, str]] = []
    for record in iter_jsonl_records(files):
        question, answer = record.get("question"), record.get("answer")
        if isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip():
            pairs.append((question[:400], answer))
    rng = random.Random(seed)
    rng.shuffle(pairs)
    chosen = pairs[:count]
    lengths = [len(ids) for ids in tokenizer([a for _, a in chosen])["input_ids"]]
    return [Request(q, max(4, min(cap, n))) for (q, _), n in zip(chosen, lengths, strict=True)], source


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


# ----- the HTTP client side -----

async def one_stream(client: httpx.AsyncClient, url: str, req: Request) -> dict[str, Any]:
    body = {"prompt": req.question, "max_new_tokens": req.tokens, "min_new_tokens": req.tokens,
            "temperature": 0.7, "seed": 1}
    started = time.perf_counter()
    stamps: list[float] = []
    completion = 0
    async with client.stream("POST", url + "/chat/stream", json=body) as response:
        response.raise_for_status()
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "delta":
                stamps.append(time.perf_counter())
            elif line.startswith("data:") and event == "done":
                completion = json.loads(line[5:])["usage"]["completion_tokens"]
    ended = time.perf_counter()
    return {"start": started, "end": ended, "ttft": (stamps[0] if stamps else ended) - started,
            "itl": [b - a for a, b in zip(stamps, stamps[1:], strict=False)], "tokens": completion}


def engine_totals(url: str) -> dict[str, float]:
    """The server's running totals from /metrics (prompt tokens, prompt-cache reuse, the worker's time)."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("doctorglm_") and name.endswith("_total"):
            values[name.removeprefix("doctorglm_").removesuffix("_total")] = float(value)
    return values


def worker_time(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """What the server's engine did between two readings: its decode step under this load, the mean batch,
    the share of its time in prefills, and how busy it was."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    steps, busy = max(d.get("decode_steps", 0), 1), d.get("decode_seconds", 0) + d.get("prefill_seconds", 0)
    return {"step_ms": d.get("decode_seconds", 0) / steps * 1000, "mean_rows": d.get("decode_rows", 0) / steps,
            "prefill_share": d.get("prefill_seconds", 0) / max(busy, 1e-9), "busy_share": busy / seconds,
            "prompt_cache_share": d.get("prompt_cache_reused_tokens", 0) / max(d.get("prompt_tokens", 0), 1)}


def summary(results: list[dict[str, Any]]) -> dict[str, float]:
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] * 1000 for r in results]
    itl = [gap * 1000 for r in results for gap in r["itl"]]
    return {"requests": len(results), "seconds": span, "output_tokens": tokens, "tokens_per_s": tokens / span,
            "requests_per_s": len(results) / span, "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99)}


async def sequential(url: str, reqs: list[Request]) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=600) as client:
        return summary([await one_stream(client, url, r) for r in reqs])


async def closed_loop(url: str, reqs: list[Request], clients: int) -> dict[str, float]:
    todo = list(reqs)
    results: list[dict[str, Any]] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while todo:
            results.append(await one_stream(client, url, todo.pop(0)))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return summary(results)


async def open_loop(url: str, reqs: list[Request], rate: float, seed: int = 1) -> dict[str, float]:
    """Poisson arrivals at `rate` requests/s, each sent when it arrives whatever the server is doing."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=len(reqs) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        tasks = []
        for req in reqs:
            tasks.append(asyncio.ensure_future(one_stream(client, url, req)))
            await asyncio.sleep(rng.expovariate(rate))
        return summary(list(await asyncio.gather(*tasks)))


# ----- in process: the engine's step by part, and transformers' continuous batching as a peer -----

def _engine(model_dir: Path, rows: int, pack_cpu_linear: bool = True) -> Any:
    from llm.loading import load_model
    from service.engine.local import LocalEngine

    engine = LocalEngine(load_model(model_dir), max_batch_size=rows, max_queue=rows + 8, context_tokens=2048,
                         repetition_guard=False, pack_cpu_linear=pack_cpu_linear)
    engine.start()
    return engine


def _run_all(engine: Any, items: list[tuple[str, int]]) -> float:
    """Seconds for the engine to generate exactly these lengths, all submitted at once, greedy."""
    from service.engine.types import GenerationRequest, SamplingParams

    async def one(question: str, tokens: int) -> None:
        params = SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0)
        async for _ in engine.stream(GenerationRequest(message=question, params=params)):
            pass

    async def together() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(one(q, n) for q, n in items))
        return time.perf_counter() - started

    return asyncio.run(together())


def engine_in_process(model_dir: Path, reqs: list[Request]) -> dict[str, Any]:
    """Our engine without HTTP: all requests at once (the peer's workload), as many rows as requests and 8."""
    from llm.chat_format import build_prompt_ids

    engine = _engine(model_dir, len(reqs))
    try:
        _run_all(engine, [("warm-up", 8)])
        all_s = _run_all(engine, [(r.question, r.tokens) for r in reqs])
        engine.max_batch_size = 8  # the service's default
        batch8_s = _run_all(engine, [(r.question, r.tokens) for r in reqs])
    finally:
        engine.stop()
    prompts = [build_prompt_ids(engine.tokenizer, [], r.question, 2048) for r in reqs]
    return {"all_at_once_tokens_per_s": sum(r.tokens for r in reqs) / all_s,
            "all_at_once_batch8_tokens_per_s": sum(r.tokens for r in reqs) / batch8_s,
            "prompt_tokens_mean": statistics.mean(len(p) for p in prompts)}


def decode_steps(model_dir: Path, question: str, reps: int = 10, tokens: int = 96) -> dict[str, Any]:
    """A decode step by part at batch 1 and 8, with the linear layers packed for oneDNN (as served on CPU) and
    as loaded. The machine's speed drifts by ±20 % within seconds, so batch 1 and batch 8 run back to back (in
    alternating order: `reps` is even, so each order runs equally often) and each pair gives one ratio: the figure
    is the median of `reps` such paired ratios, beside the median step of each case; packed against unpacked is
    paired the same way (their batch-8 runs of one repetition)."""
    from service.engine.local import StepTimings

    engines = {"packed": _engine(model_dir, 8), "unpacked": _engine(model_dir, 8, pack_cpu_linear=False)}
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}  # each case's runs, in repetition order
    try:
        for engine in engines.values():
            _run_all(engine, [("warm-up", 8)])
        for rep in range(reps):
            for name, engine in engines.items():
                for batch in ((1, 8) if rep % 2 == 0 else (8, 1)):
                    engine.timings = StepTimings()
                    _run_all(engine, [(question, tokens)] * batch)
                    t = engine.timings
                    parts = {k.removesuffix("_s"): v / t.steps * 1000 for k, v in dataclasses.asdict(t).items()
                             if k.endswith("_s") and k != "prefill_s"}
                    runs.setdefault((name, batch), []).append(
                        {"ms": parts, "step_ms": t.decode_s / t.steps * 1000, "rows": t.rows / t.steps})
    finally:
        for engine in engines.values():
            engine.stop()

    def paired(a: tuple[str, int], b: tuple[str, int]) -> list[float]:
        """Per repetition, case a's step over case b's: within one repetition the cases run seconds apart."""
        return [x["step_ms"] / y["step_ms"] for x, y in zip(runs[a], runs[b], strict=True)]

    out: dict[str, Any] = {}
    for (name, batch), rows in runs.items():
        ordered = sorted(rows, key=lambda r: r["step_ms"])
        out.setdefault(name, {})[str(batch)] = {**ordered[len(ordered) // 2],
                                                "all_step_ms": [r["step_ms"] for r in rows]}
    out["packed_vs_unpacked_batch8"] = statistics.median(paired(("packed", 8), ("unpacked", 8)))
    for name in engines:
        out[name]["pair_ratios"] = ratios = paired((name, 8), (name, 1))
        out[name]["batch8_vs_batch1"] = statistics.median(ratios)
    return out


def transformers_peer(model_dir: Path, reqs: list[Request]) -> dict[str, float]:
    """transformers' ContinuousBatchingManager on the same prompts and lengths, all at once, greedy."""
    import torch
    from transformers import GenerationConfig

    from llm.chat_format import build_prompt_ids
    from llm.loading import load_model

    loaded = load_model(model_dir)
    prompts = [build_prompt_ids(loaded.tokenizer, [], r.question, 2048) for r in reqs]
    config = GenerationConfig(max_new_tokens=max(r.tokens for r in reqs), do_sample=False,
                              eos_token_id=loaded.tokenizer.eos_token_id, pad_token_id=loaded.tokenizer.pad_token_id)
    manager = loaded.model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        with torch.inference_mode():
            warm = manager.add_request(prompts[0], max_new_tokens=4, eos_token_id=-1)
            while not (result := manager.get_result(request_id=warm, timeout=60)) or not result.is_finished():
                pass
            started = time.perf_counter()
            # eos -1: no end-of-text, so every request generates its answer's length (as min = max does for us)
            ids = {manager.add_request(p, max_new_tokens=r.tokens, eos_token_id=-1) for p, r in
                   zip(prompts, reqs, strict=True)}
            tokens = 0
            while ids:
                result = manager.get_result(timeout=120)
                if result is None:
                    raise RuntimeError("transformers' continuous batching stopped answering")
                if result.is_finished() and result.request_id in ids:
                    ids.discard(result.request_id)
                    tokens += len(result.generated_tokens)
            seconds = time.perf_counter() - started
    finally:
        manager.stop(block=True, timeout=30)
    return {"tokens_per_s": tokens / seconds, "output_tokens": tokens, "seconds": seconds}


# ----- issue 13: a converted ChatGLM3 -----

def chatglm3_row(cache: Path, threads: str, clients: int) -> dict[str, Any] | None:
    if not (CHATGLM3 / "config.json").is_file():
        return None
    out = Path(tempfile.mkdtemp(prefix="bench-chatglm3-"))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "training", "convert", str(CHATGLM3), str(out / "model")], cwd=ROOT,
                   check=True, capture_output=True)
    convert_s = time.perf_counter() - started
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out / "model")
    params = sum(p.stat().st_size for p in (out / "model").glob("*.safetensors")) / 4
    server = start_server(cache, out / "logs", {"DOCTORGLM_MODEL_PATH": str(out / "model"),
                                                "DOCTORGLM_MAX_BATCH_SIZE": str(clients), "OMP_NUM_THREADS": threads})
    try:
        reqs = [Request(q, 64) for q in ("头痛恶心两天", "孩子发烧三天，咳嗽有痰，怎么办？", "胃痛怎么办",
                                         "失眠多梦", "高血压能吃党参吗", "腹泻三天", "皮疹发痒", "咳嗽有痰")][:clients]
        asyncio.run(sequential(server.url, reqs[:1]))  # warm-up
        seq = asyncio.run(sequential(server.url, reqs))
        conc = asyncio.run(closed_loop(server.url, reqs, clients))
    finally:
        server.stop()
    return {"model": f"converted chatglm3-6b fixture (hidden {config.hidden_size}, {config.num_hidden_layers} "
                     f"layers, ~{params / 1e6:.2f}M parameters)", "convert_s": convert_s, "tokens": 64,
            "sequential": seq, "concurrent": conc,
            "concurrent_vs_sequential": conc["tokens_per_s"] / seq["tokens_per_s"]}


# ----- the chart -----

def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["open_loop"]
    rates = [r["rate"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(rates, [r["tokens_per_s"] for r in rows], "o-", color="#e83", label="engine, open loop (HTTP/SSE)")
    left.axhline(results["sequential"]["tokens_per_s"], color="#888", ls="--", label="one at a time (HTTP/SSE)")
    left.axhline(results["closed_loop"]["tokens_per_s"], color="#48a", ls=":",
                 label=f"{results['clients']} clients, closed loop")
    left.axhline(results["transformers_peer"]["tokens_per_s"], color="#4a7", ls="-.",
                 label="transformers continuous batching (in process, all at once)")
    left.axhline(results["engine_in_process"]["all_at_once_tokens_per_s"], color="#a4a", ls="-.",
                 label="engine (in process, all at once)")
    left.axhline(results["engine_in_process"]["all_at_once_batch8_tokens_per_s"], color="#a4a", ls=":",
                 label="engine (in process, batch 8)")
    left.set_xlabel("arrival rate (requests / s, Poisson)")
    left.set_ylabel("output tokens / s")
    left.legend(fontsize=7)
    right.plot(rates, [r["ttft_p99_ms"] for r in rows], "o-", color="#e83", label="TTFT p99")
    right.plot(rates, [r["ttft_p50_ms"] for r in rows], "o--", color="#e83", alpha=0.6, label="TTFT p50")
    right.plot(rates, [r["itl_p99_ms"] for r in rows], "s-", color="#48a", label="inter-token p99")
    right.plot(rates, [r["itl_p50_ms"] for r in rows], "s--", color="#48a", alpha=0.6, label="inter-token p50")
    right.set_xlabel("arrival rate (requests / s, Poisson)")
    right.set_ylabel("ms")
    right.set_yscale("log")
    right.legend(fontsize=7)
    fig.suptitle(f"Serving {results['model']} on {os.cpu_count()} shared CPU cores, {results['requests']} requests "
                 f"per rate, answer lengths of {results['workload']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="requests per open-loop rate (>= 64 for the issue)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=16,
                        help="the server's DOCTORGLM_MAX_BATCH_SIZE: room for Poisson bursts above the mean "
                             "concurrency (a closed loop of --clients never runs more than --clients rows)")
    parser.add_argument("--max-tokens", type=int, default=128, help="cap on an answer's length")
    # Finer steps where saturation lies (between the closed loop's rate and 1.5x it): the goal is the best rate
    # the server sustains with TTFT p99 <= 1 s, which a quarter-step grid brackets only loosely.
    parser.add_argument("--rates", default="0.25,0.5,0.75,1,1.125,1.25,1.375,1.5",
                        help="open-loop rates, as fractions of the closed loop's request rate")
    parser.add_argument("--sequential", type=int, default=16, help="requests sent one at a time")
    parser.add_argument("--threads", default="1", help="torch intra-op threads (OMP_NUM_THREADS) everywhere")
    parser.add_argument("--skip-chatglm3", action="store_true")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = args.threads
    import torch

    torch.set_num_threads(int(args.threads))
    from transformers import AutoTokenizer

    cache = ROOT / ".cache" / "bench"
    model_dir = ensure_default_model(cache)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rates = [float(m) for m in args.rates.split(",")]
    # Every phase gets questions no earlier phase sent: a repeated prompt would be a prompt-cache hit that real
    # patients do not give (what they share is the template and, for the same likely disease, the brief).
    reqs, source = workload(tokenizer, 2 + 2 * args.sequential + (1 + len(rates)) * args.requests, args.max_tokens)
    fresh = iter(reqs)

    def take(n: int) -> list[Request]:
        return [next(fresh) for _ in range(n)]

    lengths = [r.tokens for r in reqs]
    print(f"model {model_dir.name}; {len(reqs)} requests from {source}; answer tokens p50 {pct(lengths, 50)}, "
          f"mean {statistics.mean(lengths):.0f}, max {max(lengths)}; torch threads {args.threads}", flush=True)
    results: dict[str, Any] = {"model": model_dir.name, "workload": source, "requests": args.requests,
                               "clients": args.clients, "max_batch": args.max_batch, "max_tokens": args.max_tokens,
                               "threads": args.threads,
                               "answer_tokens": {"p50": pct(lengths, 50), "mean": statistics.mean(lengths),
                                                 "max": max(lengths)},
                               "load_average_start": os.getloadavg()}
    server = start_server(cache, cache / "logs", {"DOCTORGLM_MAX_BATCH_SIZE": str(args.max_batch),
                                                  "DOCTORGLM_MAX_QUEUE": str(4 * args.requests),
                                                  "OMP_NUM_THREADS": args.threads})
    try:
        asyncio.run(sequential(server.url, take(2)))  # warm-up
        before = engine_totals(server.url)
        results["sequential_before"] = seq = asyncio.run(sequential(server.url, take(args.sequential)))
        seq["worker"] = w = worker_time(before, engine_totals(server.url), seq["seconds"])
        print(f"one at a time: {seq['tokens_per_s']:.0f} tok/s, {seq['requests_per_s']:.2f} req/s, "
              f"TTFT p50 {seq['ttft_p50_ms']:.0f} ms, ITL p50 {seq['itl_p50_ms']:.1f} ms; in the server: decode step "
              f"{w['step_ms']:.2f} ms, prefills {w['prefill_share']:.0%} of the worker's time, worker busy "
              f"{w['busy_share']:.0%}", flush=True)
        closed_reqs = take(args.requests)
        before = engine_totals(server.url)
        results["closed_loop"] = closed = asyncio.run(closed_loop(server.url, closed_reqs, args.clients))
        closed["worker"] = w = worker_time(before, engine_totals(server.url), closed["seconds"])
        closed["prompt_cache_share"] = w["prompt_cache_share"]
        print(f"{args.clients} clients closed loop: {closed['tokens_per_s']:.0f} tok/s, "
              f"{closed['requests_per_s']:.2f} req/s, TTFT p99 {closed['ttft_p99_ms']:.0f} ms; in the server: decode "
              f"step {w['step_ms']:.2f} ms at {w['mean_rows']:.1f} rows on average, prefills {w['prefill_share']:.0%} "
              f"of the worker's time, worker busy {w['busy_share']:.0%}; prompt tokens from the prompt cache: "
              f"{w['prompt_cache_share']:.0%}", flush=True)
        results["open_loop"] = []
        for fraction in rates:
            rate = fraction * closed["requests_per_s"]
            row = {"rate": rate, "rate_vs_closed_loop": fraction,
                   **asyncio.run(open_loop(server.url, take(args.requests), rate))}
            results["open_loop"].append(row)
            print(f"open loop {rate:.2f} req/s: {row['tokens_per_s']:.0f} tok/s, "
                  f"TTFT p50/p99 {row['ttft_p50_ms']:.0f}/{row['ttft_p99_ms']:.0f} ms, "
                  f"ITL p50/p99 {row['itl_p50_ms']:.1f}/{row['itl_p99_ms']:.1f} ms", flush=True)
        results["sequential_after"] = after = asyncio.run(sequential(server.url, take(args.sequential)))
        print(f"one at a time, again: {after['tokens_per_s']:.0f} tok/s", flush=True)
    finally:
        server.stop()
    # The same closed loop on a server without the prompt cache: what reusing prompt beginnings buys.
    server = start_server(cache, cache / "logs", {"DOCTORGLM_MAX_BATCH_SIZE": str(args.max_batch),
                                                  "DOCTORGLM_MAX_QUEUE": str(4 * args.requests),
                                                  "OMP_NUM_THREADS": args.threads, "DOCTORGLM_PROMPT_CACHE_MB": "0"})
    try:
        asyncio.run(sequential(server.url, reqs[:2]))  # warm-up
        results["closed_loop_no_prompt_cache"] = uncached = asyncio.run(  # the same questions, on a fresh server
            closed_loop(server.url, closed_reqs, args.clients))
        print(f"{args.clients} clients closed loop without the prompt cache: {uncached['tokens_per_s']:.0f} tok/s, "
              f"TTFT p50/p99 {uncached['ttft_p50_ms']:.0f}/{uncached['ttft_p99_ms']:.0f} ms", flush=True)
    finally:
        server.stop()
    base = (seq["tokens_per_s"] + after["tokens_per_s"]) / 2
    results["sequential"] = {**seq, "tokens_per_s": base}
    for row in results["open_loop"]:
        row["vs_sequential"] = row["tokens_per_s"] / base
    peer_reqs = closed_reqs
    results["engine_in_process"] = ours = engine_in_process(model_dir, peer_reqs)
    results["transformers_peer"] = peer = transformers_peer(model_dir, peer_reqs)
    # The step with nn.Linear as loaded (MKL) too, to show what the oneDNN-packed weights buy.
    results["decode_steps"] = steps = decode_steps(model_dir, peer_reqs[0].question)
    b1, b8 = steps["packed"]["1"]["step_ms"], steps["packed"]["8"]["step_ms"]
    u8 = steps["unpacked"]["8"]["step_ms"]
    ratio, ratio_unpacked = steps["packed"]["batch8_vs_batch1"], steps["unpacked"]["batch8_vs_batch1"]
    print(f"in process, {len(peer_reqs)} requests at once: engine {ours['all_at_once_tokens_per_s']:.0f} tok/s "
          f"({ours['all_at_once_batch8_tokens_per_s']:.0f} at batch 8), transformers continuous batching "
          f"{peer['tokens_per_s']:.0f} tok/s", flush=True)
    print(f"decode step: batch 1 {b1:.2f} ms, batch 8 {b8:.2f} ms (medians); batch 8 / batch 1 {ratio:.2f}x "
          f"(median of {len(steps['packed']['pair_ratios'])} back-to-back pairs: "
          + ", ".join(f"{x:.2f}" for x in steps["packed"]["pair_ratios"]) + "); by part at 8: "
          + ", ".join(f"{k} {v:.2f}" for k, v in steps["packed"]["8"]["ms"].items()), flush=True)
    print(f"decode step with nn.Linear unpacked: batch 1 {steps['unpacked']['1']['step_ms']:.2f} ms, batch 8 "
          f"{u8:.2f} ms; batch 8 / batch 1 {ratio_unpacked:.2f}x", flush=True)
    if not args.skip_chatglm3:
        results["chatglm3"] = glm3 = chatglm3_row(cache, args.threads, args.clients)
        if glm3:
            print(f"{glm3['model']}: {args.clients} clients {glm3['concurrent']['tokens_per_s']:.0f} tok/s vs one at "
                  f"a time {glm3['sequential']['tokens_per_s']:.0f} ({glm3['concurrent_vs_sequential']:.2f}x)",
                  flush=True)
    # Past saturation an open loop's queue grows without bound (TTFT with it): the figure that counts is the
    # best throughput at a rate the server still keeps up with (TTFT p99 within 1 s).
    kept_up = [r for r in results["open_loop"] if r["ttft_p99_ms"] <= 1000] or results["open_loop"][:1]
    saturated = max(kept_up, key=lambda r: r["tokens_per_s"])
    results["ratios"] = {
        "closed_loop_vs_sequential": closed["tokens_per_s"] / base,
        "closed_loop_prompt_cache_on_vs_off": closed["tokens_per_s"] / uncached["tokens_per_s"],
        "open_loop_best_within_1s_ttft_p99_vs_sequential": saturated["vs_sequential"],
        "open_loop_best_within_1s_ttft_p99_rate": saturated["rate"],
        "open_loop_best_within_1s_ttft_p99_ms": saturated["ttft_p99_ms"],
        "open_loop_max_vs_sequential": max(r["vs_sequential"] for r in results["open_loop"]),
        "step_batch8_vs_batch1": ratio,
        # The same, read from the server's own counters: the closed loop's rows against one at a time, with the
        # designed prompts' real lengths and the HTTP/SSE work sharing the CPU (informational: not 8 rows exactly).
        "server_step_closed_loop_vs_one_at_a_time": (closed["worker"]["step_ms"] / seq["worker"]["step_ms"]
                                                     if seq["worker"]["step_ms"] else float("nan")),
        "step_batch8_vs_batch1_unpacked": ratio_unpacked,
        "step_batch8_packed_vs_unpacked": steps["packed_vs_unpacked_batch8"],
        "engine_vs_transformers_cb_in_process": ours["all_at_once_tokens_per_s"] / peer["tokens_per_s"],
        "engine_batch8_vs_transformers_cb_in_process": ours["all_at_once_batch8_tokens_per_s"] / peer["tokens_per_s"],
    }
    results["load_average_end"] = os.getloadavg()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "serving.png")
    r = results["ratios"]
    print(f"{'goal':52} {'measured':>10}")
    print(f"{'closed loop 8 clients / one at a time (>= 3.5x)':52} {r['closed_loop_vs_sequential']:9.2f}x")
    print(f"{'  closed loop, prompt cache on / off':52} {r['closed_loop_prompt_cache_on_vs_off']:9.2f}x")
    print(f"{'open loop, best rate with TTFT p99 <= 1 s / one at a time (>= 3.5x)':52} "
          f"{r['open_loop_best_within_1s_ttft_p99_vs_sequential']:9.2f}x")
    print(f"{'  at (req/s) / its TTFT p99 (ms)':52} {r['open_loop_best_within_1s_ttft_p99_rate']:9.2f} / "
          f"{r['open_loop_best_within_1s_ttft_p99_ms']:.0f}")
    print(f"{'open loop, any rate / one at a time':52} {r['open_loop_max_vs_sequential']:9.2f}x")
    print(f"{'decode step batch 8 / batch 1 (<= 1.5x)':52} {r['step_batch8_vs_batch1']:9.2f}x")
    print(f"{'  the same with nn.Linear unpacked':52} {r['step_batch8_vs_batch1_unpacked']:9.2f}x")
    print(f"{'  in the server: closed loop / one at a time':52} {r['server_step_closed_loop_vs_one_at_a_time']:9.2f}x "
          f"({closed['worker']['mean_rows']:.1f} rows on average)")
    print(f"{'  batch-8 step, packed / unpacked':52} {r['step_batch8_packed_vs_unpacked']:9.2f}x")
    print(f"{'engine / transformers continuous batching (same rows)':52} "
          f"{r['engine_vs_transformers_cb_in_process']:9.2f}x")
    print(f"{'engine at batch 8 / transformers continuous batching':52} "
          f"{r['engine_batch8_vs_transformers_cb_in_process']:9.2f}x")
    print(f"load average at start / end: {results['load_average_start'][0]:.1f} / {results['load_average_end'][0]:.1f}"
          " (the machine is shared)")
    print(f"wrote {out / 'serving.json'} and {out / 'serving.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
