#!/usr/bin/env bash
# Steering iteration on one GPU, ours against PyTorch/diffusers on the same machine, same random
# weights and inputs: an SD2.1-base-size UNet at 64x64 latents and a FLUX.1-dev-size transformer
# (19 double + 38 single blocks, 512 T5 tokens, guidance embedding) with and without gradient
# checkpointing. Made for a lent machine with PyTorch + diffusers and no Rust toolchain: our half is
# a CUDA build of the benchmark examples made elsewhere,
#
#   cargo build --release --features cuda -p l2s-models --examples
#
# then its target/release/examples/bench_unet and bench_flux copied along with this checkout (only
# those two: the folder holds every example and its build files), into the folder BENCH_EXAMPLES
# names. Where that folder also holds `cuda_ops`, the test binary of the fused ops' CUDA kernels
# (`cargo test --release --features cuda -p l2s-models --test cuda_ops --no-run` prints its path),
# it runs first, as the step cuda-ops-tests.
#
#   tools/gpu/bench.sh                              # the real sizes, cuda, bf16
#   BENCH_SIZE=tiny DEVICE=cpu tools/gpu/bench.sh   # the plumbing, on any machine, in seconds
#
# Environment:
#   BENCH_EXAMPLES  folder with bench_unet and bench_flux (default target/release/examples)
#   BENCH_SIZE      full (default) or tiny
#   DEVICE          cuda (default) or cpu;  DTYPE bf16 (cuda default) or f32 (cpu default)
#   FLUX_RES        FLUX image side in pixels (default 1024: 4096 image tokens; tiny: 64)
#   RUNS, WARMUP    timed runs and warm-up runs of each measurement (default 3 and 1)
#   BUDGET_S        wall-clock budget of the whole script (default 450): a step gets what is left
#   OUT             results folder (default ./gpu-bench-out): results.jsonl, logs/
#   BENCH_WORK      where the generated weights go (default /tmp/l2s-gpu-bench; about 26 GB at
#                   full size, removed at the end unless BENCH_KEEP=1)
#   PYTHON          Python with torch and diffusers (default python3)
#
# Each measurement is one JSON line in $OUT/results.jsonl with "step" naming it; a step that fails
# or runs out of time writes a line with "error" instead, and the steps that needed it are skipped.
# Peak GPU memory: the PyTorch half reports torch.cuda.max_memory_allocated; for both halves the
# script also samples the device's used memory with nvidia-smi every 100 ms while the step runs
# and reports the largest sample less the memory in use before the step
# (gpu_used_peak_mib_nvidia_smi: includes the CUDA context and allocator caches, and can miss a
# peak shorter than 100 ms). Our half runs each setting in its own process, so its figure is that
# setting's alone.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
START=$(date +%s)
PY=${PYTHON:-python3}
EXAMPLES=${BENCH_EXAMPLES:-target/release/examples}
SIZE=${BENCH_SIZE:-full}
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then DTYPE=${DTYPE:-bf16}; else DTYPE=${DTYPE:-f32}; fi
RUNS=${RUNS:-3}
WARMUP=${WARMUP:-1}
BUDGET_S=${BUDGET_S:-450}
OUT=${OUT:-./gpu-bench-out}
WORK=${BENCH_WORK:-/tmp/l2s-gpu-bench}
RESULTS=$OUT/results.jsonl
LOGS=$OUT/logs

fail() {
    echo "tools/gpu/bench.sh: $*" >&2
    if [ -d "$OUT" ]; then
        "$PY" -c 'import json, sys; print(json.dumps({"step": "preflight", "error": sys.argv[1]}))' "$*" \
            >>"$RESULTS" 2>/dev/null || true
    fi
    exit 1
}

case "$SIZE" in
full) UNET_SIZE=sd21 FLUX_SIZE=dev FLUX_RES=${FLUX_RES:-1024} NEED_GB=30 ;;
tiny) UNET_SIZE=tiny FLUX_SIZE=tiny FLUX_RES=${FLUX_RES:-64} NEED_GB=1 ;;
*) echo "tools/gpu/bench.sh: BENCH_SIZE=$SIZE: expected full or tiny" >&2; exit 2 ;;
esac
case "$DEVICE" in cuda | cpu) ;; *) echo "tools/gpu/bench.sh: DEVICE=$DEVICE: expected cuda or cpu" >&2; exit 2 ;; esac

mkdir -p "$OUT" "$LOGS" || { echo "tools/gpu/bench.sh: cannot create $OUT" >&2; exit 1; }
: >"$RESULTS"

# --- what the run needs, each named when missing ----------------------------------------------
command -v timeout >/dev/null || fail "no 'timeout' command (coreutils): it keeps every step bounded"
command -v "$PY" >/dev/null || fail "no Python at '$PY': set PYTHON to one with torch and diffusers"
timeout 180 "$PY" -c 'import torch, diffusers, safetensors, numpy' 2>"$LOGS/preflight-python.err"
case $? in
0) ;;
124) fail "$PY took over 180 s to import torch and diffusers" ;;
*) fail "$PY cannot import torch, diffusers, safetensors and numpy: $(tail -1 "$LOGS/preflight-python.err")" ;;
esac
for ex in bench_unet bench_flux; do
    [ -x "$EXAMPLES/$ex" ] || fail "no executable $EXAMPLES/$ex: build it elsewhere with" \
        "'cargo build --release --features cuda -p l2s-models --examples' and set BENCH_EXAMPLES to its folder"
done
if [ "$DEVICE" = cuda ]; then
    # Our CUDA build links cuBLAS, cuRAND, NVRTC and the CUDA runtime; PyTorch's wheels carry them,
    # after any the machine has on its own library path.
    NV_LIBS=$(timeout 60 "$PY" -c 'import glob, os, nvidia
print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__
                       for p in glob.glob(os.path.join(d, "*", "lib", "lib*.so*"))})))' 2>/dev/null || true)
    [ -z "$NV_LIBS" ] || export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$NV_LIBS"
fi
MISSING_LIBS=$(ldd "$EXAMPLES/bench_flux" 2>/dev/null | awk '/not found/ {print $1}' | tr '\n' ' ')
[ -z "$MISSING_LIBS" ] || fail "$EXAMPLES/bench_flux needs shared libraries not found here: $MISSING_LIBS(set LD_LIBRARY_PATH)"
timeout 120 "$EXAMPLES/bench_flux" --probe "$DEVICE" >"$LOGS/preflight-probe.out" 2>"$LOGS/preflight-probe.err" ||
    fail "$EXAMPLES/bench_flux cannot use device $DEVICE (a build without --features cuda, or no GPU or driver): $(head -c 300 "$LOGS/preflight-probe.err")"
SMI=""
if [ "$DEVICE" = cuda ]; then
    timeout 120 "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
        fail "torch sees no CUDA device"
    if command -v nvidia-smi >/dev/null && timeout 30 nvidia-smi -L >"$LOGS/nvidia-smi-L.txt" 2>&1; then
        SMI=nvidia-smi
    else
        echo "tools/gpu/bench.sh: no working nvidia-smi: our half's peak GPU memory will be missing" >&2
    fi
fi
mkdir -p "$WORK" || fail "cannot create BENCH_WORK=$WORK"
FREE_GB=$(df -P -BG "$WORK" | awk 'NR==2 {sub("G", "", $4); print $4}')
[ "${FREE_GB:-0}" -ge "$NEED_GB" ] || fail "$WORK has ${FREE_GB:-?} GB free, the $SIZE weights need $NEED_GB GB"
[ "${BENCH_KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK/unet" "$WORK/flux"' EXIT

gpu_used_mib() {
    timeout 20 nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 2>/dev/null | head -1
}

# step NAME LIMIT_S COMMAND...: runs COMMAND with at most LIMIT_S seconds (less if the budget is
# nearly spent), keeps its JSON lines with the step's name and memory figures added, or writes an
# error line. Returns the command's status.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then
        record_error "$name" "skipped: the ${BUDGET_S} s budget is spent"
        return 1
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name (at most ${limit} s)" >&2
    local base="" smi_pid=""
    if [ -n "$SMI" ]; then
        base=$(gpu_used_mib)
        timeout $((limit + 30)) nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 \
            >"$LOGS/$name.gpu-mem" 2>/dev/null &
        smi_pid=$!
    fi
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$LOGS/$name.out" 2>"$LOGS/$name.err"
    rc=$?
    [ -z "$smi_pid" ] || { kill "$smi_pid" 2>/dev/null; wait "$smi_pid" 2>/dev/null; }
    local why=""
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        why="timed out after ${limit} s"
    elif [ "$rc" -ne 0 ]; then
        if grep -qiE "out of memory|OUT_OF_MEMORY" "$LOGS/$name.err"; then why="out of GPU memory"; else why="exit status $rc"; fi
        why="$why: $(grep -v '^ ' "$LOGS/$name.err" | grep -v '^$' | tail -3 | tr '\n' ' ' | head -c 400)"
    fi
    "$PY" - "$name" "$LOGS/$name.out" "$LOGS/$name.gpu-mem" "${base:-}" "$(($(date +%s) - t0))" "$why" >>"$RESULTS" <<'PYEOF'
import json, os, sys
name, out, mem, base, wall, why = sys.argv[1:]
extra = {"step": name, "step_wall_s": int(wall)}
if base and os.path.exists(mem):
    samples = [int(x) for x in open(mem).read().split() if x.isdigit()]
    if samples:
        extra["gpu_used_peak_mib_nvidia_smi"] = max(samples) - int(base)
        extra["gpu_used_note"] = "nvidia-smi memory.used, largest 100 ms sample less the use before the step"
lines = [l for l in open(out).read().splitlines() if l.startswith("{")] if os.path.exists(out) else []
if why:
    print(json.dumps({**extra, "error": why}))
for l in lines:
    print(json.dumps({**extra, **json.loads(l)}))
PYEOF
    return "$rc"
}

record_error() {
    "$PY" -c 'import json, sys; print(json.dumps({"step": sys.argv[1], "error": sys.argv[2]}))' "$1" "$2" >>"$RESULTS"
    echo "== $1: $2" >&2
}

# --- the fused ops' CUDA kernels against the CPU, forward and backward, four dtypes ------------
if [ "$DEVICE" = cuda ] && [ -x "$EXAMPLES/cuda_ops" ]; then
    step cuda-ops-tests 120 bash -c '"$0" --test-threads=1 >&2 &&
        echo "{\"impl\": \"ours\", \"tests\": \"tests/cuda_ops.rs passed\"}"' "$EXAMPLES/cuda_ops"
fi

# --- SD2.1-base-size UNet: steering iteration at batch 1 ----------------------------------------
rm -rf "$WORK/unet"
if step unet-torch 150 "$PY" tools/fixtures/bench_unet_torch.py --size "$UNET_SIZE" --only steer \
    --device "$DEVICE" --dtype "$DTYPE" --runs "$((RUNS + 2))" --warmup "$((WARMUP + 1))" --save "$WORK/unet"; then
    step unet-ours 120 "$EXAMPLES/bench_unet" "$WORK/unet" "$((RUNS + 2))" "$((WARMUP + 1))" \
        --device "$DEVICE" --dtype "$DTYPE"
else
    record_error unet-ours "skipped: the PyTorch half wrote no model"
fi
rm -rf "$WORK/unet"

# --- FLUX.1-dev-size transformer: steering iteration, checkpointing off and on -------------------
rm -rf "$WORK/flux"
if step flux-torch 240 "$PY" tools/fixtures/bench_flux_torch.py --size "$FLUX_SIZE" --res "$FLUX_RES" \
    --checkpointing both --device "$DEVICE" --dtype "$DTYPE" --runs "$RUNS" --warmup "$WARMUP" \
    --save "$WORK/flux"; then
    # Checkpointing on first: the setting steering uses at this size, and the likelier to fit.
    for ck in on off; do
        step "flux-ours-checkpointing-$ck" 120 "$EXAMPLES/bench_flux" "$WORK/flux" "$RUNS" "$WARMUP" \
            --checkpointing "$ck" --device "$DEVICE" --dtype "$DTYPE"
    done
else
    record_error flux-ours "skipped: the PyTorch half wrote no model"
fi

echo "== results ($RESULTS), $(($(date +%s) - START)) s in all" >&2
"$PY" - "$RESULTS" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "error" in r:
        print(f"{r['step']:<28} ERROR {r['error']}")
        continue
    if "tests" in r:
        print(f"{r['step']:<28} {r['tests']}")
        continue
    t = r.get("steer_fwd_bwd_batch1_s", r.get("steer_fwd_bwd_s"))
    mem = r.get("gpu_peak_allocated_mib")
    smi = r.get("gpu_used_peak_mib_nvidia_smi")
    ck = "" if "checkpointing" not in r else f" ckpt={'on' if r['checkpointing'] else 'off'}"
    print(f"{r['step']:<28} {r['impl']:<7}{ck:<10} {t:8.3f} s"
          + (f"  alloc peak {mem:8.0f} MiB" if mem is not None else "")
          + (f"  nvidia-smi peak {smi:8.0f} MiB" if smi is not None else "")
          + (f"  rss {r['peak_rss_mib']:.0f} MiB" if r.get("peak_rss_mib") else "")
          + "".join(f"  err {k} {v:.1e}" for k, v in r.get("rel_err_vs_torch", {}).items()))
PYEOF
! grep -q '"error"' "$RESULTS"
