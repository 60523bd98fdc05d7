#!/usr/bin/env bash
# The same job on a tiny Alpamayo 1.5 checkpoint: camera-labelled prompt, generated navigation text,
# the unguided suffix, training with a no-route share, evaluation with / without the route and guided.
#   bash scripts/demo15.sh [OUT_DIR]      (default cache/demo15; BIN as for scripts/demo.sh)
set -euo pipefail
OUT=${1:-cache/demo15}
BIN=${BIN:-.venv/bin}
PY=${PY:-$BIN/python}
export TOKENIZERS_PARALLELISM=false
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n==> %s\n' "$*"; }

step "tiny Alpamayo 1.5 checkpoint (random weights; the inferred release config form)"
"$PY" -m shared.tiny_checkpoint15 "$OUT/tiny"

step "synthetic world in the PhysicalAI-AV on-disk layout"
"$BIN/synth-world" "$OUT/world" --clips 12 --seed 0 --width 192 --height 108

step "cache-build: 1.5 prompt, front camera, navigation generated from the path, unguided suffix"
"$BIN/cache-build" --dataset "$OUT/world" --checkpoint "$OUT/tiny/alpamayo" --out "$OUT/store" \
    --cameras front-only --keyframes stride:2 --batch-size 4 --navigation generate --unguided
"$BIN/cache-inspect" summary "$OUT/store"

step "head-train with 10% no-route items"
"$BIN/head-train" --cache "$OUT/store" --out "$OUT/run" --steps 100 --batch-size 4 --warmup-steps 10 \
    --log-every 25 --unguided-mix 0.1

step "evaluation: with the route (w = 1), without it, and guided (w = 1.5, noise temperature 0.6)"
H="$OUT/run/head.safetensors"
"$BIN/head-eval" --cache "$OUT/store" --head "$H" --out "$OUT/eval_route.json"
"$BIN/head-eval" --cache "$OUT/store" --head "$H" --out "$OUT/eval_noroute.json" --navigation none
"$BIN/head-eval" --cache "$OUT/store" --head "$H" --out "$OUT/eval_w15.json" --guidance-weight 1.5 \
    --noise-temperature 0.6

step "export: the 1.5 checkpoint's own key set and config.json"
"$BIN/head-export" --head "$H" --out "$OUT/export"
