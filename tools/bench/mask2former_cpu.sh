#!/usr/bin/env bash
# Mask2Former CPU benchmark: PyTorch (transformers) and candle on identical models and input,
# in one run. Needs Python with torch + transformers + safetensors. Prints two JSON lines.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DIR=${BENCH_DIR:-target/bench-m2f}
RUNS=${RUNS:-3}
CONFIGS=${CONFIGS:-tiny,mid,swin-s}
cargo build --release -q -p l2s-detect --example bench
"$PY" tools/fixtures/bench_mask2former_torch.py --threads "$(nproc)" --runs "$RUNS" --configs "$CONFIGS" --save "$DIR" 2>/dev/null
target/release/examples/bench "$DIR" "$RUNS" "$CONFIGS"
