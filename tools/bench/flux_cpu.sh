#!/usr/bin/env bash
# FLUX CPU benchmark: diffusers and candle on the identical FluxTransformer2DModel, one steering
# iteration each (text-only attention capture, attention loss, backward to the latent), one run.
# Needs Python with torch + diffusers (see tools/fixtures/README.md). Prints two JSON lines.
#
# SIZE=schnell (default: full-width FLUX.1-schnell blocks, 256 T5 tokens), dev or tiny; DOUBLE and
# SINGLE set the number of blocks (default 1 and 2: the whole 19 + 38 does not fit in memory at
# f32), RES the image side in pixels (default 256: 256 image tokens), CHECKPOINTING off or on.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DIR=${BENCH_DIR:-target/bench-flux}
RUNS=${RUNS:-3}
WARMUP=${WARMUP:-1}
SIZE=${SIZE:-schnell}
DOUBLE=${DOUBLE:-1}
SINGLE=${SINGLE:-2}
CHECKPOINTING=${CHECKPOINTING:-off}
THREADS=${THREADS:-$(nproc)}
export RAYON_NUM_THREADS=$THREADS
cargo build --release -q -p l2s-models --example bench_flux
"$PY" tools/fixtures/bench_flux_torch.py --size "$SIZE" --double "$DOUBLE" --single "$SINGLE" \
    ${RES:+--res "$RES"} --checkpointing "$CHECKPOINTING" --threads "$THREADS" \
    --runs "$RUNS" --warmup "$WARMUP" --save "$DIR" 2>/dev/null
target/release/examples/bench_flux "$DIR" "$RUNS" "$WARMUP" --checkpointing "$CHECKPOINTING"
