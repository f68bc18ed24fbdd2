#!/usr/bin/env bash
# Shapes-model training benchmark: PyTorch (diffusers + transformers) and ours on the same model,
# the same shipped starting weights and the same fixed batches, one thread each (THREADS=N for
# more), measured in one run. Needs Python with torch + diffusers + transformers (see
# tools/fixtures/README.md).
# Prints JSON lines: batch preparation (ours), the PyTorch step, our step (with its losses
# compared with PyTorch's), and, unless CLI_STEPS=0, the whole `l2s shapes train` command.
# BUILD=0 uses the binaries already in target/release.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DIR=${BENCH_DIR:-target/bench-shapes-train}
RUNS=${RUNS:-10}
WARMUP=${WARMUP:-3}
BATCHES=${BATCHES:-4}
CLI_STEPS=${CLI_STEPS:-20}
# Threads for both sides (default one each).
THREADS=${THREADS:-1}
export CANDLE_NUM_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS \
    MKL_NUM_THREADS=$THREADS
BUILD=${BUILD:-1}
if [ "$BUILD" = 1 ]; then
    cargo build --release -q -p l2s-shapes-model --example bench_train
fi
mkdir -p "$DIR"
target/release/examples/bench_train "$DIR" --write-batches "$BATCHES"
"$PY" tools/fixtures/bench_shapes_train_torch.py "$DIR" --threads "$THREADS" --runs "$RUNS" --warmup "$WARMUP" 2>/dev/null
target/release/examples/bench_train "$DIR" "$RUNS" "$WARMUP"
if [ "$CLI_STEPS" -gt 0 ]; then
    if [ "$BUILD" = 1 ]; then
        cargo build --release -q -p l2s-cli
    fi
    # The whole command (rendering, checkpoint and export included) at two lengths: the
    # difference is the cost of the extra steps alone.
    for n in 2 "$CLI_STEPS"; do
        rm -rf "$DIR/cli-$n"
        /usr/bin/time -f "%U %S %M" -o "$DIR/cli-$n.time" target/release/l2s --quiet shapes train \
            --out "$DIR/cli-$n" --steps "$n" --init-from shapes 2>/dev/null
    done
    "$PY" - "$DIR" "$CLI_STEPS" <<'PYEOF'
import json, sys
d, n = sys.argv[1], int(sys.argv[2])
def read(k):
    u, s, m = open(f"{d}/cli-{k}.time").read().split()[-3:]
    return float(u) + float(s), int(m) / 1024
(c2, _), (cn, rss) = read(2), read(n)
per = (cn - c2) / (n - 2)
print(json.dumps({"impl": "l2s shapes train", "steps": [2, n], "cpu_s": [c2, cn],
                  "step_cpu_s": per, "steps_per_cpu_s": 1 / per, "peak_rss_mib": rss}))
PYEOF
fi
