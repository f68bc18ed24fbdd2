#!/usr/bin/env bash
# Disk full on a real file system: a data build into a 600 KiB tmpfs fails naming the shard it
# could not write and keeps the shards before it; after growing the tmpfs the rerun finishes, and
# its folder equals an uninterrupted build's file for file. Needs root (mount).
set -euo pipefail
cd "$(dirname "$0")/../.."
L2S="${L2S:-target/release/l2s}"
work=$(mktemp -d)
mnt="$work/tmpfs"
mkdir -p "$mnt"
mount -t tmpfs -o size=600k tmpfs "$mnt"
trap 'umount "$mnt"; rm -rf "$work"' EXIT
args=(--limit 6 --steps 4 --min-psnr 0 --shard-size 3 -q)
"$L2S" shapes render --count 12 --out "$work/scenes" -q
"$L2S" data build --images "$work/scenes" --out "$work/reference" "${args[@]}"
if "$L2S" data build --images "$work/scenes" --out "$mnt/d" "${args[@]}"; then
  echo "expected the build to fail on the full tmpfs" >&2
  exit 1
fi
echo "left after the failure:"
ls -l "$mnt/d"
wc -l < "$mnt/d/manifest.jsonl"
mount -o remount,size=4m "$mnt"
"$L2S" data build --images "$work/scenes" --out "$mnt/d" "${args[@]}"
diff -r "$work/reference" "$mnt/d"
echo "resumed build identical to the uninterrupted one"
