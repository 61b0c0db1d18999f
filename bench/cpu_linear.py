"""Linear layers on CPU: nn.Linear (MKL) against the weight packed once for oneDNN (llm/cpu_linear.py).

For the layer shapes of the embedded model (and one of a 6 B model's), at 1, 8 and 240 rows (a decode step
alone, a batch of 8, a prefill), on one torch thread by default: microseconds per call (best of 3 runs of
300 calls) and the ratio packed / nn.Linear. Layers below llm.cpu_linear.MIN_PACKED_WEIGHTS stay nn.Linear in
the engine; this shows why.

    python bench/cpu_linear.py [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm.cpu_linear import MIN_PACKED_WEIGHTS, PackedLinear  # noqa: E402

# (out, in): the tiny GLM's q/o, k/v, down, gate+up and output layers, and a 6 B model's attention projection.
SHAPES = [(256, 256), (128, 256), (256, 688), (1376, 256), (8192, 256), (4096, 4096)]


def per_call_us(layer: nn.Module, x: torch.Tensor, calls: int) -> float:
    with torch.inference_mode():
        for _ in range(20):
            layer(x)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(calls):
                layer(x)
            best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s); packed in the engine from {MIN_PACKED_WEIGHTS:,} "
          "weights")
    print(f"{'layer (out x in)':>18} {'weights':>10} {'rows':>5} {'nn.Linear us':>13} {'packed us':>10} {'ratio':>6}")
    for out_features, in_features in SHAPES:
        linear = nn.Linear(in_features, out_features).eval()
        packed = PackedLinear(linear)
        for rows in (1, 8, 240):
            x = torch.randn(rows, in_features)
            calls = 30 if out_features * in_features * rows > 10**8 else 300
            plain_us, packed_us = per_call_us(linear, x, calls), per_call_us(packed, x, calls)
            print(f"{out_features:>8} x {in_features:<7} {out_features * in_features:>10,} {rows:>5} "
                  f"{plain_us:>13.0f} {packed_us:>10.0f} {packed_us / plain_us:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
