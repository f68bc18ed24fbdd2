#!/usr/bin/env bash
# UNet CPU benchmark: PyTorch and candle on the identical mid-size UNet, measured in one run.
# Needs Python with torch + diffusers (see tools/fixtures/README.md). Prints two JSON lines, and a
# third when BASELINE names another build's target/release/examples/bench_unet (an older commit's),
# run on the same model and inputs in the same run.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DIR=${BENCH_DIR:-target/bench-unet}
RUNS=${RUNS:-5}
# Threads for both halves (candle reads RAYON_NUM_THREADS).
THREADS=${THREADS:-$(nproc)}
export RAYON_NUM_THREADS=$THREADS
cargo build --release -q -p l2s-models --example bench_unet
"$PY" tools/fixtures/bench_unet_torch.py --threads "$THREADS" --runs "$RUNS" --save "$DIR" 2>/dev/null
target/release/examples/bench_unet "$DIR" "$RUNS"
if [ -n "${BASELINE:-}" ]; then
    "$BASELINE" "$DIR" "$RUNS" | sed 's/"impl":"candle"/"impl":"candle-baseline"/'
fi
