#!/usr/bin/env bash
# `l2s score --detector mask2former` throughput, one image per forward pass vs a batch: the
# tiny and mid random-weight configs of bench_mask2former_torch.py, a GenEval folder of 512x512
# position-prompt images, wall time of the whole command (decode, detect, judge, write).
# Needs Python with torch + transformers + safetensors + pillow (for the weights and images).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DIR=${BENCH_DIR:-target/bench-score}
IMAGES=${IMAGES:-8}
BATCH=${BATCH:-4}
CONFIGS=${CONFIGS:-tiny,mid}
cargo build --release -q -p l2s-cli
mkdir -p "$DIR"
"$PY" tools/fixtures/bench_mask2former_torch.py --threads "$(nproc)" --runs 1 --configs "$CONFIGS" --save "$DIR/weights" >/dev/null 2>&1
"$PY" - "$DIR/images" "$IMAGES" <<'PY'
import json, os, sys
from PIL import Image, ImageDraw
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    os.makedirs(f"{root}/{i:05}/samples", exist_ok=True)
    meta = {"tag": "position", "include": [{"class": "dog", "count": 1},
            {"class": "cat", "count": 1, "position": ["left of", 0]}],
            "prompt": "a photo of a cat left of a dog"}
    open(f"{root}/{i:05}/metadata.jsonl", "w").write(json.dumps(meta))
    im = Image.new("RGB", (512, 512), (90 + 10 * i, 120, 160))
    d = ImageDraw.Draw(im)
    d.ellipse((40 + 8 * i, 200, 200, 380), fill=(200, 150, 60))
    d.rectangle((300, 180 - 4 * i, 470, 420), fill=(60, 60, 50))
    im.save(f"{root}/{i:05}/samples/0000.png")
PY
for cfg in ${CONFIGS//,/ }; do
  for b in 1 "$BATCH"; do
    start=$(date +%s.%N)
    /usr/bin/time -f "%M" -o "$DIR/rss" target/release/l2s score "$DIR/images" --detector mask2former \
      --detector-weights "$DIR/weights/$cfg.safetensors" --device cpu --batch-size "$b" -q \
      --out "$DIR/$cfg-$b.jsonl" --summary "$DIR/$cfg-$b.json" >/dev/null
    end=$(date +%s.%N)
    printf '{"config": "%s", "batch": %s, "images": %s, "seconds": %.2f, "images_per_s": %.3f, "peak_rss_mb": %d}\n' \
      "$cfg" "$b" "$IMAGES" "$(echo "$end - $start" | bc)" "$(echo "$IMAGES / ($end - $start)" | bc -l)" \
      "$(( $(cat "$DIR/rss") / 1024 ))"
  done
  cmp -s "$DIR/$cfg-1.jsonl" "$DIR/$cfg-$BATCH.jsonl" && echo "$cfg: results identical for batch 1 and $BATCH" \
    || echo "$cfg: results DIFFER between batch 1 and $BATCH"
done
