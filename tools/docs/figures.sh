#!/usr/bin/env bash
# Regenerates the figures in docs/ with the release binary and the shapes-model examples.
#
#   tools/docs/figures.sh [samples] [steer] [loss] [report]     (default: all four)
#
#   samples  docs/shapes-samples.png: the built-in model at its own defaults (50 steps, guidance
#            1.25), four prompts × seeds 0–1, 4× enlarged
#   steer    docs/steer-star-heart.png: "a star to the left of a heart", seeds 0–3 at 20 steps;
#            rows: the model alone, --steer centroid, Learn-to-Steer with the built-in classifier
#            and its schedule (crates/shapes-model/weights/shapes-classifier/steering.json)
#   preview  docs/steer-preview.png: the README's first command (--steer l2s --seed 2 --preview)
#   loss     docs/shapes-loss.png: the loss curve `l2s shapes train` writes into its run folder;
#            copied from SHAPES_RUN=RUN_DIR/loss.png. The committed curve is run 3 of the built-in
#            model's training (BENCHMARKS.md); without SHAPES_RUN it is left as it is
#   report   docs/report-screenshot.png: tools/report/screenshot.sh --demo (needs Chromium;
#            skipped without it)
#
# Images are written under WORK (default target/figures). The same command gives the same bytes.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
work=${WORK:-target/figures}
want=${*:-samples steer preview loss report}

cargo build -q --release -p l2s-cli -p l2s-shapes-model --example figure_grid
l2s=target/release/l2s
grid=target/release/examples/figure_grid
mkdir -p "$work"

has() { case " $want " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if has samples; then
    files=()
    i=0
    for prompt in "a star to the left of a heart" "a circle above a square" "a ring and a cross" \
        "a diamond below a triangle"; do
        "$l2s" -q generate --prompt "$prompt" --num-images 2 --out "$work/samples/$i" >/dev/null
        files+=("$work/samples/$i/0000.png" "$work/samples/$i/0001.png")
        i=$((i + 1))
    done
    "$grid" 8 docs/shapes-samples.png "${files[@]}"
fi

if has steer; then
    prompt="a star to the left of a heart"
    "$l2s" -q generate --prompt "$prompt" --steps 20 --num-images 4 --out "$work/steer/plain" >/dev/null
    "$l2s" -q generate --prompt "$prompt" --steps 20 --num-images 4 --steer centroid \
        --out "$work/steer/centroid" >/dev/null
    # The built-in classifier at the schedule its steering.json records.
    "$l2s" -q generate --prompt "$prompt" --steer l2s --num-images 4 --out "$work/steer/l2s" >/dev/null
    files=()
    for row in plain centroid l2s; do
        for s in 0000 0001 0002 0003; do files+=("$work/steer/$row/$s.png"); done
    done
    "$grid" 4 docs/steer-star-heart.png "${files[@]}"
fi

if has preview; then
    "$l2s" -q generate --prompt "a star to the left of a heart" --steer l2s --seed 2 \
        --out "$work/preview.png" --preview docs/steer-preview.png >/dev/null
    echo docs/steer-preview.png
fi

if has loss; then
    if [ -n "${SHAPES_RUN:-}" ]; then
        cp "$SHAPES_RUN/loss.png" docs/shapes-loss.png
        echo docs/shapes-loss.png
    else
        echo "docs/shapes-loss.png left as it is: it is the loss.png of a training run folder" \
            "(l2s shapes train --out RUN_DIR ...); set SHAPES_RUN=RUN_DIR to take it from one" >&2
    fi
fi

if has report; then
    if command -v chromium >/dev/null || command -v chromium-browser >/dev/null ||
        command -v google-chrome >/dev/null; then
        tools/report/screenshot.sh --demo docs/report-screenshot.png
    else
        echo "docs/report-screenshot.png left as it is: headless Chromium not found" \
            "(Debian: apt-get install -y chromium)" >&2
    fi
fi
