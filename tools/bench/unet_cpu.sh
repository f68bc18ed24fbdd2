#!/usr/bin/env bash
# UNet CPU benchmark: PyTorch and candle on the identical mid-size UNet, measured in one run.
# Needs Python with torch + diffusers (see tools/fixtures/README.md). Prints two JSON lines.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DIR=${BENCH_DIR:-target/bench-unet}
RUNS=${RUNS:-5}
cargo build --release -q -p l2s-models --example bench_unet
"$PY" tools/fixtures/bench_unet_torch.py --threads "$(nproc)" --runs "$RUNS" --save "$DIR" 2>/dev/null
target/release/examples/bench_unet "$DIR" "$RUNS"
