#!/usr/bin/env bash
# Renders an `l2s report` page in headless Chromium and saves a screenshot: a check that the page
# draws (images, frames, boxes, table, filters) without a network or any other file.
#
#   tools/report/screenshot.sh REPORT.html[#show=wrong&q=WORD] OUT.png [WIDTHxHEIGHT]
#       screenshot an existing report (default window 1200x900); the optional #… part presets
#       the page's filters (show=all|wrong|right|differ, q=search text), which also exercises
#       its script
#   tools/report/screenshot.sh --demo OUT.png [WIDTHxHEIGHT]
#       build a demonstration first: two runs of drawn shapes-world scenes (objects placed at
#       random vs. placed as the prompt asks, with a few objects left out and one image missing),
#       scored with `l2s score` and shown with `l2s report` (made by the `demo_report` test of
#       crates/cli/tests/eval_report.rs into target/report-demo/), then screenshot it
#
# Needs Chromium (Debian: apt-get install -y chromium). The screenshot is taken with a throwaway
# profile and with background networking, component updates and sync switched off.
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 2 ] || usage

root=$(cd "$(dirname "$0")/../.." && pwd)
if [ "$1" = "--demo" ]; then
    demo="$root/target/report-demo"
    (cd "$root" && L2S_REPORT_DEMO_DIR="$demo" cargo test -q -p l2s-cli --test eval_report demo_report >/dev/null)
    html="$demo/report.html"
else
    html=$1
fi
# A "#…" suffix presets the page's filters.
anchor=""
case "$html" in *'#'*) anchor="#${html#*#}"; html=${html%%#*} ;; esac
out=$2
size=${3:-1200x900}
[ -f "$html" ] || { echo "no such report: $html" >&2; exit 1; }
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "Chromium not found (Debian: apt-get install -y chromium)" >&2; exit 1; }

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
abs_html=$(cd "$(dirname "$html")" && pwd)/$(basename "$html")
abs_out=$(mkdir -p "$(dirname "$out")" && cd "$(dirname "$out")" && pwd)/$(basename "$out")
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --hide-scrollbars \
    --user-data-dir="$profile" --window-size="${size/x/,}" --screenshot="$abs_out" \
    "file://$abs_html$anchor" 2>/dev/null
[ -s "$abs_out" ] || { echo "no screenshot written" >&2; exit 1; }
echo "$abs_out"
