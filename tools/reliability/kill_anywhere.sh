#!/usr/bin/env bash
# kill -9 anywhere, in full: `l2s data build`, `l2s train`, `l2s eval` and `l2s shapes train`
# each killed with SIGKILL at KILLS seeded random moments (default 20), restarted until done,
# and compared file for file with an uninterrupted run (crates/cli/tests/kill_resume.rs; the
# test suite runs the same test with 2 kills per command).
set -euo pipefail
cd "$(dirname "$0")/../.."
KILLS="${KILLS:-20}"
L2S_KILLS="$KILLS" nice -n 19 cargo test --release -p l2s-cli --test kill_resume -- --nocapture
