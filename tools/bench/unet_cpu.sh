#!/usr/bin/env bash
# UNet CPU benchmark: PyTorch and candle on the identical UNet, measured in one run.
# SIZE=mid (default, 19.4 M parameters, 32x32 latent) or sd21 (SD2.1-base's shape, 64x64 latent);
# ONLY=steer measures the steering iteration alone.
# Needs Python with torch + diffusers (see tools/fixtures/README.md). Prints two JSON lines, and a
# third when BASELINE names another build's target/release/examples/bench_unet (an older commit's),
# run on the same model and inputs in the same run.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DIR=${BENCH_DIR:-target/bench-unet}
RUNS=${RUNS:-5}
WARMUP=${WARMUP:-2}
SIZE=${SIZE:-mid}
ONLY=${ONLY:-all}
# Threads for both halves (candle reads RAYON_NUM_THREADS).
THREADS=${THREADS:-$(nproc)}
export RAYON_NUM_THREADS=$THREADS
cargo build --release -q -p l2s-models --example bench_unet
"$PY" tools/fixtures/bench_unet_torch.py --size "$SIZE" --only "$ONLY" --threads "$THREADS" \
    --runs "$RUNS" --warmup "$WARMUP" --save "$DIR" 2>/dev/null
target/release/examples/bench_unet "$DIR" "$RUNS" "$WARMUP"
if [ -n "${BASELINE:-}" ]; then
    "$BASELINE" "$DIR" "$RUNS" "$WARMUP" | sed 's/"impl":"candle"/"impl":"candle-baseline"/'
fi
