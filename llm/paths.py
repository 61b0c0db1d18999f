"""Where the project's own files live, and the default cache directory."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_LIBRARY = REPO_ROOT / "knowledge" / "data" / "sample_diseases.jsonl"
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache"


def cache_dir() -> Path:
    """The cache the service uses too (DOCTORGLM_CACHE_DIR, the same variable the service's settings read)."""
    return Path(os.environ.get("DOCTORGLM_CACHE_DIR") or DEFAULT_CACHE_DIR)
