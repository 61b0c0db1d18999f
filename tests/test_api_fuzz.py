"""schemathesis over /openapi.json against the real server: no server errors, no schema violations.

CI size (a few cases per operation, time-bounded); bench/api_fuzz.py runs the benchmark size (>= 1,000 cases).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("schemathesis")

from bench.api_fuzz import FUZZ_ENV, fuzz  # noqa: E402
from tests.server import start_server  # noqa: E402


def test_schemathesis_finds_no_server_error_or_schema_violation(cache_dir: Path, default_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    server = start_server(cache_dir, tmp_path, FUZZ_ENV)
    try:
        result = fuzz(server.url, max_examples=10, max_time=40)
    finally:
        code = server.stop()
    print(f"schemathesis: {result['cases']} cases in {result['seconds']}s, statuses {result['statuses']}")
    assert result["exit_code"] == 0, str(result["output"])[-4000:]
    assert result["server_errors"] == 0
    assert result["cases"] >= 50
    assert code == 0
