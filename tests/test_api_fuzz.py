"""Fuzz the real server: every nested string of valid bodies made hostile (content parts, history, stop...),
and schemathesis over /openapi.json: no server errors, no schema violations.

CI size (a few cases per operation, time-bounded); bench/api_fuzz.py runs the benchmark size (>= 1,000 cases).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.api_fuzz import FUZZ_ENV, SEEDS, fuzz, fuzz_nested_strings, leaves, mutations
from tests.server import start_server


def _at(value: object, path: tuple[object, ...]) -> object:
    for step in path:
        try:
            value = value[step]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def test_mutations_reach_content_parts_and_every_nested_string() -> None:
    bodies = [(route, json.loads(body)) for route, body in mutations()]
    string_paths = [(route, path) for route, seed in SEEDS for path, leaf in leaves(seed) if isinstance(leaf, str)]
    assert ("/v1/chat/completions", ("messages", 1, "content", 0, "text")) in string_paths  # a user part
    assert ("/v1/chat/completions", ("messages", 2, "content", 0, "text")) in string_paths  # an assistant part
    for route, path in string_paths:
        reached = {json.dumps(_at(body, path)) for r, body in bodies if r == route}
        assert {'"\\ud800"', "5", "null", '"\\u200b\\u200c\\ufeff"'} <= reached, (route, path)


def test_hostile_nested_strings_get_no_server_error(cache_dir: Path, default_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(cache_dir, tmp_path, FUZZ_ENV)
    try:
        result = fuzz_nested_strings(server.url)
    finally:
        code = server.stop()
    print(f"nested strings: {result['cases']} cases in {result['seconds']}s, statuses {result['statuses']}")
    assert not result["failures"], result["failures"][:5]
    assert result["cases"] >= 300 and code == 0


def test_schemathesis_finds_no_server_error_or_schema_violation(cache_dir: Path, default_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    pytest.importorskip("schemathesis")
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
