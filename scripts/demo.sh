#!/usr/bin/env bash
# The main job end to end on the embedded default: tiny random-weight checkpoint + synthetic world.
#   bash scripts/demo.sh [OUT_DIR]      (make demo runs it into cache/demo)
set -euo pipefail
OUT=${1:-cache/demo}
BIN=${BIN:-.venv/bin}
export TOKENIZERS_PARALLELISM=false
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n==> %s\n' "$*"; }

step "tiny official-format checkpoint (random weights)"
"$BIN/tiny-checkpoint" "$OUT/tiny"

step "synthetic world in the PhysicalAI-AV on-disk layout"
"$BIN/synth-world" "$OUT/world" --clips 24 --seed 0 --width 192 --height 108

step "curve scan"
"$BIN/curve-scan" "$OUT/world" --threshold 0.05 --output "$OUT/curve_scan.json"

step "cache-build: teacher-forced prefix, front camera only, bf16 store"
"$BIN/cache-build" --dataset "$OUT/world" --checkpoint "$OUT/tiny/alpamayo" --out "$OUT/store" \
    --cameras front-only --keyframes stride:2 --batch-size 4

step "cache-inspect"
"$BIN/cache-inspect" summary "$OUT/store"

step "baseline evaluation (released head) on the val split"
"$BIN/head-eval" --cache "$OUT/store" --out "$OUT/eval_baseline.json"

step "head-train (CPU)"
"$BIN/head-train" --cache "$OUT/store" --out "$OUT/run" --steps 300 --batch-size 4 --warmup-steps 30 \
    --save-every 100 --log-every 25

step "fine-tuned evaluation + comparison plot"
"$BIN/head-eval" --cache "$OUT/store" --out "$OUT/eval_finetuned.json" --head "$OUT/run/head.safetensors" \
    --baseline "$OUT/eval_baseline.json" --plot "$OUT/comparison.png"

step "export a full official checkpoint with the fine-tuned head"
"$BIN/head-export" --head "$OUT/run/head.safetensors" --out "$OUT/export"

printf '\nDemo done. Results:\n  %s\n  %s\n  %s\n  %s\n' "$OUT/eval_baseline.json" "$OUT/eval_finetuned.json" \
    "$OUT/comparison.png" "$OUT/export"
