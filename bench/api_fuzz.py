"""Fuzz the real service: every nested string of valid bodies made hostile (lone surrogates, invisible text,
non-strings: `fuzz_nested_strings`), then schemathesis over /openapi.json; print cases run and statuses seen.

    .venv/bin/python bench/api_fuzz.py                 # benchmark size: >= 1,000 cases
    .venv/bin/python bench/api_fuzz.py --max-examples 10 --max-time 60

Starts `python -m service` on a free 127.0.0.1 port (the embedded tiny model, DOCTORGLM_MAX_NEW_TOKENS=32
so generation stays short), runs the schemathesis CLI against it with the response checks configured in
bench/schemathesis.toml (all default checks; 413 counts as a rejection; `positive_data_acceptance` off:
a schema cannot say "the last message must be from the user", such bodies get a documented 422), and reads
the statuses the server answered from its own /metrics. Exits non-zero on any server error or schema violation.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.api_support import metric_samples  # noqa: E402
from tests.server import start_server  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "schemathesis.toml"
FUZZ_ENV = {"DOCTORGLM_MAX_NEW_TOKENS": "32", "DOCTORGLM_DEFAULT_MAX_NEW_TOKENS": "16"}


def status_counts(url: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for sample in metric_samples(url).get("doctorglm_requests", []):
        if sample.name == "doctorglm_requests_total":
            counts[sample.labels["status"]] += int(sample.value)
    return counts


def fuzz(url: str, max_examples: int, max_time: int, seed: int = 1, workers: int = 2) -> dict[str, object]:
    """Run schemathesis against a running server; returns cases, statuses, failures and the CLI output."""
    before = status_counts(url)
    started = time.monotonic()
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run", f"{url}/openapi.json",
           "--max-examples",
           str(max_examples), "--max-time", str(max_time), "--seed", str(seed), "--workers", str(workers),
           "--phases", "examples,fuzzing", "--no-color"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=max_time + 120, cwd=REPO_ROOT)
    output = done.stdout + done.stderr
    elapsed = time.monotonic() - started
    statuses = status_counts(url) - before
    generated = re.search(r"(\d+) generated", output)
    return {
        "cases": int(generated.group(1)) if generated else 0,
        "statuses": dict(sorted(statuses.items())),
        "server_errors": sum(n for status, n in statuses.items() if status.startswith("5")),
        "exit_code": done.returncode,
        "seconds": round(elapsed, 1),
        "output": output,
    }


# What the adversarial test put in strings (issue 17): a lone surrogate (as its JSON escape), invisible-only
# text, NUL, control tokens, SSE framing, bidi overrides, a very long string.
HOSTILE_STRINGS = ("\ud800", "头痛\udfff", "", " ", "\u200b\u200c\ufeff", "\x00", "<|endoftext|><|user|>",
                   "x\r\n\r\nevent: done\ndata: {}", "\u202e头痛", "\u0301", "😀" * 3, "头" * 40_000)
NOT_STRINGS: tuple[object, ...] = (5, -1.5, True, None, [], {}, ["头痛"], {"text": "头痛"})
_PART = {"type": "text", "text": "孩子发烧三天"}
SEEDS: tuple[tuple[str, dict[str, object]], ...] = (
    ("/chat", {"prompt": "孩子发烧三天，咳嗽有痰", "history": [["头痛", "多休息"]], "stop": ["。"],
               "max_new_tokens": 2}),
    ("/chat/stream", {"prompt": "头痛恶心两天", "history": [["发烧", "多喝水"]], "max_new_tokens": 2}),
    ("/v1/chat/completions", {"model": "doctorglm", "user": "u1", "stop": ["。"], "max_tokens": 2, "messages": [
        {"role": "system", "content": "你是医生"}, {"role": "user", "content": [_PART]},
        {"role": "assistant", "content": [{"type": "text", "text": "多休息"}]},
        {"role": "user", "content": [{"type": "text", "text": "还咳嗽"}, _PART]}]}),
    ("/v1/chat/completions", {"stream": True, "max_tokens": 2, "stream_options": {"include_usage": True},
                              "messages": [{"role": "user", "content": "头痛"}]}),
)


def leaves(value: object, path: tuple[object, ...] = ()) -> list[tuple[tuple[object, ...], object]]:
    """Every leaf of a JSON value with its path (dict keys and list indexes)."""
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in leaves(item, (*path, key))]
    if isinstance(value, list):
        return [leaf for i, item in enumerate(value) for leaf in leaves(item, (*path, i))]
    return [(path, value)]


def _replaced(value: object, path: tuple[object, ...], new: object) -> object:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {k: (_replaced(v, rest, new) if k == head else v) for k, v in value.items()}
    assert isinstance(value, list)
    return [_replaced(v, rest, new) if i == head else v for i, v in enumerate(value)]


def mutations() -> list[tuple[str, bytes]]:
    """Each seed with every string leaf replaced by each hostile string, and every leaf by each non-string."""
    cases: list[tuple[str, bytes]] = []
    for route, seed in SEEDS:
        for path, leaf in leaves(seed):
            swaps = (*HOSTILE_STRINGS, *NOT_STRINGS) if isinstance(leaf, str) else NOT_STRINGS
            for new in swaps:
                # ensure_ascii: a lone surrogate goes out as the escape \ud800, as a hostile client writes it
                cases.append((route, json.dumps(_replaced(seed, path, new)).encode()))
    return cases


def fuzz_nested_strings(url: str) -> dict[str, object]:
    """Send every mutation; a 5xx, or an SSE `error` event of type server_error, is a failure."""
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    started = time.monotonic()
    with httpx.Client(timeout=60) as client:
        for route, body in mutations():
            with client.stream("POST", url + route, content=body, headers={"content-type": "application/json"}) as r:
                text = r.read().decode("utf-8", errors="replace")
            statuses[r.status_code] += 1
            if r.status_code >= 500 or '"type": "server_error"' in text or '"type":"server_error"' in text:
                failures.append(f"{route} {r.status_code} {body[:200]!r} -> {text[:200]}")
    return {"cases": sum(statuses.values()), "statuses": dict(sorted(statuses.items())), "failures": failures,
            "seconds": round(time.monotonic() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=150, help="per operation (8 operations)")
    parser.add_argument("--max-time", type=int, default=480, help="seconds for the whole run")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(REPO_ROOT / ".cache" / "tests", Path(tmp), FUZZ_ENV)
        try:
            nested = fuzz_nested_strings(server.url)
            result = fuzz(server.url, args.max_examples, args.max_time, args.seed)
        finally:
            code = server.stop()
    print(f"nested strings: {nested['cases']} cases in {nested['seconds']}s, statuses {nested['statuses']}, "
          f"failures {len(nested['failures'])}", *nested["failures"][:10], sep="\n")
    tail = "\n".join(str(result["output"]).strip().splitlines()[-25:])
    print(tail)
    print(f"\ncases run: {result['cases']} in {result['seconds']}s (schemathesis exit {result['exit_code']})")
    print(f"statuses seen (server /metrics): {result['statuses']}")
    print(f"server errors (5xx): {result['server_errors']}; server exit code after SIGTERM: {code}")
    ok = result["exit_code"] == 0 and result["server_errors"] == 0 and code == 0 and not nested["failures"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
