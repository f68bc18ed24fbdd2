#!/usr/bin/env bash
# Type-checks the CUDA build (`cargo check --features cuda`) on a machine without a GPU,
# so that code behind the `cuda` feature cannot rot unnoticed.
#
#   tools/gpu/check-cuda.sh [extra cargo check arguments…]
#   CUDA_CHECK=rust tools/gpu/check-cuda.sh      (what .ci/run runs)
#
# CUDA_CHECK=full (the default) compiles candle's kernels with NVIDIA's real nvcc from PyPI: about
# 2 hours on two cores, most of it candle's quantised-matmul kernels. CUDA_CHECK=rust checks the
# Rust side only, with tools/gpu/nvcc-standin in nvcc's place (no device code is compiled, no
# toolkit is installed): every crate and all targets still type-check against candle's CUDA API,
# in minutes, and our own kernels (crates/models/src/ops/kernels.cu) are compiled by NVIDIA's NVRTC
# from PyPI, as the CUDA build compiles them at run time. CARGO_TARGET_DIR defaults to
# target/cuda-check (full) or target/cuda-rust-check.
#
# Environment: CUDA_TOOLKIT_DIR (default target/cuda-toolkit) holds a Python venv with NVIDIA's
# CUDA 13.0 packages from PyPI and a folder of links to their libraries; CARGO_TARGET_DIR defaults
# to target/cuda-check, apart from the CPU build, so neither invalidates the other.
#
# What the recipe rests on:
#  - candle's CUDA kernels are compiled by `nvcc` found on PATH (headers next to it), for the compute
#    capability in CUDA_COMPUTE_CAP (90: H100/H200).
#  - cudarc takes the CUDA version from `nvcc --version` and links cuda, cublas, cublasLt, curand,
#    nvrtc and cudart from $CUDA_HOME/lib. The PyPI wheels ship only versioned libraries (libX.so.13)
#    and no driver, so unversioned links are made here, and libcuda.so is a stub in which every
#    cu* entry point of cuda.h returns 34 (CUDA_ERROR_STUB_LIBRARY).
#  - The toolkit is pinned to 13.0.x: a newer nvcc writes PTX that a CUDA 13.0 driver refuses.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
MODE=${CUDA_CHECK:-full}
start=$(date +%s)
if [ "$MODE" = rust ]; then
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/cuda-rust-check}
    export NVCC=$ROOT/tools/gpu/nvcc-standin CUDA_COMPUTE_CAP=90
    # cudarc's build script runs `nvcc --version` from PATH.
    STANDIN_BIN=$CARGO_TARGET_DIR/nvcc-standin-bin
    mkdir -p "$STANDIN_BIN"
    ln -sf "$NVCC" "$STANDIN_BIN/nvcc"
    export PATH="$STANDIN_BIN:$PATH"
    echo "nvcc: stand-in (no device code); target: $CARGO_TARGET_DIR" >&2
    cargo check --release --features cuda -p l2s-cli -p l2s-models --all-targets "$@"
    echo "cargo check --features cuda (Rust side) passed in $(($(date +%s) - start)) s" >&2
    # Our own kernels are compiled by NVRTC when a CUDA run first needs them: compile them here
    # with the same NVRTC (one wheel, ~90 MB) for the oldest and newest targets we support.
    KIT=${CUDA_TOOLKIT_DIR:-$ROOT/target/cuda-toolkit}
    [ -x "$KIT/venv/bin/python" ] || python3 -m venv "$KIT/venv"
    "$KIT/venv/bin/pip" install -q --disable-pip-version-check nvidia-cuda-nvrtc==13.0.88
    CU=$("$KIT/venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
    for arch in compute_75 compute_90; do
        LD_LIBRARY_PATH="$CU/lib" "$KIT/venv/bin/python" tools/gpu/nvrtc-compile.py \
            "$CU/lib/libnvrtc.so.13" crates/models/src/ops/kernels.cu --gpu-architecture=$arch
    done
    exit 0
elif [ "$MODE" != full ]; then
    echo "CUDA_CHECK must be full or rust, not '$MODE'" >&2
    exit 2
fi

KIT=${CUDA_TOOLKIT_DIR:-$ROOT/target/cuda-toolkit}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/cuda-check}
mkdir -p "$KIT"

if [ ! -x "$KIT/venv/bin/python" ]; then
    python3 -m venv "$KIT/venv"
fi
"$KIT/venv/bin/pip" install -q --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 \
    nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88

# The wheels put everything under site-packages/nvidia/cu13.
CU=$("$KIT/venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
LINKS=$KIT/links/lib
mkdir -p "$LINKS"
for name in cudart cublas cublasLt nvrtc; do
    ln -sf "$CU/lib/lib$name.so.13" "$LINKS/lib$name.so"
done
ln -sf "$CU/lib/libcurand.so.10" "$LINKS/libcurand.so"

if [ ! -f "$LINKS/libcuda.so" ]; then
    # One stub function per driver entry point named in cuda.h, each failing with code 34.
    gcc -E -P -I"$CU/include" "$CU/include/cuda.h" \
        | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' \
        | sed 's/[[:space:]]*($//' | sort -u \
        | awk '{ print "int " $1 "(void) { return 34; }" }' >"$KIT/libcuda_stub.c"
    gcc -shared -fPIC -O2 -Wl,-soname,libcuda.so.1 -o "$LINKS/libcuda.so" "$KIT/libcuda_stub.c"
fi

export PATH="$CU/bin:$PATH" CUDA_HOME="$KIT/links" CUDA_COMPUTE_CAP=90
echo "nvcc: $(nvcc --version | tail -1); CUDA_HOME=$CUDA_HOME; target: $CARGO_TARGET_DIR" >&2
cargo check --release --features cuda -p l2s-cli -p l2s-models --all-targets "$@"
echo "cargo check --features cuda passed in $(($(date +%s) - start)) s" >&2
