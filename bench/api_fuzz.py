"""Fuzz the real service with schemathesis over /openapi.json; print cases run and the statuses seen.

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
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=150, help="per operation (8 operations)")
    parser.add_argument("--max-time", type=int, default=480, help="seconds for the whole run")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(REPO_ROOT / ".cache" / "tests", Path(tmp), FUZZ_ENV)
        try:
            result = fuzz(server.url, args.max_examples, args.max_time, args.seed)
        finally:
            code = server.stop()
    tail = "\n".join(str(result["output"]).strip().splitlines()[-25:])
    print(tail)
    print(f"\ncases run: {result['cases']} in {result['seconds']}s (schemathesis exit {result['exit_code']})")
    print(f"statuses seen (server /metrics): {result['statuses']}")
    print(f"server errors (5xx): {result['server_errors']}; server exit code after SIGTERM: {code}")
    return 0 if result["exit_code"] == 0 and result["server_errors"] == 0 and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
