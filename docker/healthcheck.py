#!/opt/venv/bin/python
"""Container health check: exit 0 when GET /readyz answers 200 (model and index loaded, not draining)."""

import os
import sys
import urllib.request

port = os.environ.get("DOCTORGLM_PORT", "8000")
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
try:
    with opener.open(f"http://127.0.0.1:{port}/readyz", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"
    print(f"not ready: {exc}", file=sys.stderr)
    sys.exit(1)
