#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 600) from its seeds and committed corpus, then
# minimises each corpus. JOBS targets run at once (default 1). Needs the nightly toolchain and
# cargo-fuzz (`cargo install cargo-fuzz`). Findings land in fuzz/artifacts/TARGET/. FUZZ_TARGETS
# (space-separated) runs only those; CMIN_ONLY=1 skips fuzzing and only minimises the corpora.
set -euo pipefail
cd "$(dirname "$0")/../../fuzz"
SECONDS_EACH="${FUZZ_SECONDS:-600}"
JOBS="${JOBS:-1}"
ALL="safetensors torch_pickle diffusers_config tokenizer png_text geneval_jsonl dataset classifier"
read -r -a TARGETS <<< "${FUZZ_TARGETS:-$ALL}"
mkdir -p logs
cargo +nightly fuzz build -s none
run() {
  local t="$1"
  mkdir -p "corpus/$t" "work/$t"
  # Fuzz into a scratch folder seeded from the seeds and the committed corpus.
  cp seeds/"$t"/* corpus/"$t"/* "work/$t"/ 2>/dev/null || true
  nice -n 19 cargo +nightly fuzz run -s none "$t" "work/$t" -- \
    -max_total_time="$SECONDS_EACH" -timeout=20 -rss_limit_mb=2048 > "logs/$t.log" 2>&1 || true
  grep -E "^Done [0-9]+ runs" "logs/$t.log" | sed "s/^/$t: /"
}
for t in "${TARGETS[@]}"; do
  if [ -n "${CMIN_ONLY:-}" ]; then
    mkdir -p "work/$t" && cp seeds/"$t"/* corpus/"$t"/* "work/$t"/ 2>/dev/null || true
    continue
  fi
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
  run "$t" &
done
wait
for t in "${TARGETS[@]}"; do
  # Minimised in place, then committed as the corpus.
  nice -n 19 cargo +nightly fuzz cmin -s none "$t" "work/$t" > "logs/$t.cmin.log" 2>&1
  rm -rf "corpus/$t" && cp -r "work/$t" "corpus/$t"
done
du -sh corpus
