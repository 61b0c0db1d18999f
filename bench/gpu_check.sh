#!/usr/bin/env bash
# Issue 15's GPU check, one command on a fresh CUDA machine that reaches no package registry:
#
#   bash bench/gpu_check.sh [OUT_DIR]            # JSON + log in OUT_DIR (default $OUT, else bench/results)
#   bash bench/gpu_check.sh --device cpu --small # the same steps on CPU with a tiny model (tests/test_quantization.py)
#   bash bench/gpu_check.sh --download           # beforehand, where pip reaches the registry: the wheels it installs
#
# The box needs python3 with torch (CUDA), transformers, peft, accelerate, safetensors, sentencepiece, tokenizers
# and numpy. Everything else in bench/gpu_wheels.txt travels as wheels in .cache/gpu-wheels (ignored by git;
# pass it along with the working tree) and is installed offline into .cache/gpu-site, which goes first on
# PYTHONPATH (no venv, no change to the system's packages). Then bench/quantization.py gpu-check builds a
# 1.1B-parameter GLM, merges a LoRA at load, serves it bf16 / int8 / int4 through the real engine at batch 1
# and 8, and writes tokens/s, TTFT and peak GPU memory per mode (gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${DOCTORGLM_GPU_WHEELS:-.cache/gpu-wheels}"
SITE=.cache/gpu-site
DEVICE=cuda
SMALL=()
TOKENS=128
OUT_DIR="${OUT:-bench/results}"
LIMIT_S="${DOCTORGLM_GPU_CHECK_LIMIT_S:-480}"

download() {
    # Compiled wheels for each CPython the project supports (3.11+); jieba publishes only an sdist, so a pure-Python
    # wheel of it is built here.
    mkdir -p "$WHEELS"
    local pins
    pins=$(mktemp)
    grep -v -e '^#' -e '^$' -e '^jieba==' bench/gpu_wheels.txt >"$pins"
    for version in 3.11 3.12 3.13; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
            -d "$WHEELS" -r "$pins"
    done
    "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "$(grep '^jieba==' bench/gpu_wheels.txt)"
    rm -f "$pins"
    local bytes
    bytes=$(du -sb "$WHEELS" | cut -f1)
    echo "$(find "$WHEELS" -name '*.whl' | wc -l) wheels, $((bytes / 1048576)) MiB in $WHEELS"
    if [ "$bytes" -gt $((64 * 1048576)) ]; then
        echo "over the 64 MiB that travel with the working tree" >&2
        exit 1
    fi
}

install_offline() {
    if "$PY" -c 'import fastapi, pydantic_settings, sse_starlette, jieba, rjieba, bm25s, ahocorasick' 2>/dev/null; then
        return  # already importable (e.g. the CPU dev machine)
    fi
    if [ ! -d "$WHEELS" ]; then
        echo "no $WHEELS: run 'bash bench/gpu_check.sh --download' where the registry is reachable" >&2
        exit 1
    fi
    local names
    names=$(grep -v -e '^#' -e '^$' bench/gpu_wheels.txt | cut -d= -f1)
    # shellcheck disable=SC2086  # one argument per package name
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --target "$SITE" $names
}

while [ $# -gt 0 ]; do
    case "$1" in
        --download) download; exit 0 ;;
        --device) DEVICE="$2"; shift 2 ;;
        --small) SMALL=(--small); shift ;;
        --tokens) TOKENS="$2"; shift 2 ;;
        *) OUT_DIR="$1"; shift ;;
    esac
done

mkdir -p "$OUT_DIR"
install_offline
export PYTHONPATH="$PWD/$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
"$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available(), "| transformers", transformers.__version__, "| peft", peft.__version__)'
timeout "$LIMIT_S" "$PY" bench/quantization.py gpu-check --device "$DEVICE" "${SMALL[@]}" --tokens "$TOKENS" \
    --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/gpu_check.log"
