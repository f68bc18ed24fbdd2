#!/usr/bin/env bash
# The built-in relation classifier (crates/shapes-model/weights/shapes-classifier/): how it is
# trained and how it is measured. Numbers and timings are in BENCHMARKS.md ("The built-in
# classifier").
#
#   tools/docs/builtin-classifier.sh train [WORK]
#       `l2s bench shapes --methods l2s-dual` (600 rendered two-object images, dual-inversion data
#       checked by the exact detector, the classifier, and its evaluation on the bench's prompts),
#       then copies its clf-dual classifier into the weights folder with f16 weights.
#       steering.json, the schedule, is not written here. WORK defaults to target/builtin-classifier
#   tools/docs/builtin-classifier.sh measure [OUT]
#       `l2s eval` + `l2s score` of the plain model and of the built-in classifier on the bench's 24
#       held-out prompts × 4 images at 20 steps, both runs at once (one per core). OUT defaults to
#       target/builtin-classifier-eval
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
clf=crates/shapes-model/weights/shapes-classifier

case "${1:-}" in
train)
    work=${2:-target/builtin-classifier}
    cargo build -q --release -p l2s-cli -p l2s-shapes-model --example half_weights
    target/release/l2s bench shapes --methods l2s-dual --work "$work" --workers 2
    cp "$work/clf-dual/classifier.json" "$clf/classifier.json"
    target/release/examples/half_weights "$work/clf-dual/classifier.safetensors" \
        "$clf/classifier.safetensors"
    ;;
measure)
    out=${2:-target/builtin-classifier-eval}
    cargo build -q --release -p l2s-cli -p l2s-shapes-model --example bench_prompts
    l2s=target/release/l2s
    mkdir -p "$out"
    target/release/examples/bench_prompts 24 >"$out/prompts.jsonl"
    common=(--prompts "$out/prompts.jsonl" --images-per-prompt 4 --steps 20 --guidance 1.25)
    "$l2s" -q eval "${common[@]}" --steer none --out "$out/base" &
    base=$!
    # The schedule of steering.json.
    "$l2s" -q eval "${common[@]}" --steer "$clf" --steer-steps 10 --steer-iterations 3 \
        --step-size 0.1 --normalized --stop-below 0.1 --out "$out/l2s"
    wait "$base"
    "$l2s" score "$out/base" --detector shapes
    "$l2s" score "$out/l2s" --detector shapes --compare "$out/base/results.jsonl"
    ;;
*)
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
