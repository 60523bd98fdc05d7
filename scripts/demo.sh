#!/usr/bin/env bash
# The straight-bias story end to end on the embedded default (tiny checkpoint + synthetic world):
# a STAND-IN released model whose head turns with four cameras and goes straight front-only, then
# fixed by fine-tuning the head on front-only curves.
#   bash scripts/demo.sh [OUT_DIR]      (make demo runs it into cache/demo)
set -euo pipefail
OUT=${1:-cache/demo}
BIN=${BIN:-.venv/bin}
CLIPS=${CLIPS:-48}
REL_STEPS=${REL_STEPS:-300}  # the stand-in release's head
FT_STEPS=${FT_STEPS:-300}  # the front-only fine-tuning (and its blank control)
LR=${LR:-1e-3}
export TOKENIZERS_PARALLELISM=false
rm -rf "$OUT"
mkdir -p "$OUT"
START=$SECONDS
step() { printf '\n==> [%d s] %s\n' "$((SECONDS - START))" "$*"; }
WORLD=(--clips "$CLIPS" --seed 0 --width 192 --height 108 --duration 12 --fps 10 --mix curve-rich --val-fraction 0.3)
BUILD=(--kv-dtype float32 --batch-size 4)

step "tiny official-format checkpoint (random weights)"
"$BIN/tiny-checkpoint" "$OUT/tiny"

step "synthetic world (PhysicalAI-AV layout): curve-rich, 30 % of clips held out; and the same world blanked"
"$BIN/synth-world" "$OUT/world" "${WORLD[@]}" --no-progress
"$BIN/synth-world" "$OUT/world_blank" "${WORLD[@]}" --blank --no-progress
"$BIN/curve-scan" "$OUT/world" --threshold 0.05 --output "$OUT/curve_scan.json" > /dev/null

step "STAND-IN released model, 1/3: a VLM whose prefix carries the scene (road-map vision tower; front and side ridge read-outs fit on the train split, written into the values)"
"$BIN/standin-vlm" pretrain --dataset "$OUT/world" --checkpoint "$OUT/tiny/alpamayo" --out "$OUT/standin_vlm"

step "STAND-IN released model, 2/3: its head, trained on a straight-dominated 4-camera cache"
"$BIN/standin-vlm" select --dataset "$OUT/world" --out "$OUT/release_clips.txt"
"$BIN/cache-build" --dataset "$OUT/world" --checkpoint "$OUT/standin_vlm" --out "$OUT/store_release_4cam" \
    --cameras full --clips "@$OUT/release_clips.txt" "${BUILD[@]}"
"$BIN/head-train" --cache "$OUT/store_release_4cam" --out "$OUT/run_release" --steps "$REL_STEPS" --batch-size 8 \
    --warmup-steps 20 --save-every "$REL_STEPS" --log-every 20 --lr "$LR"

step "STAND-IN released model, 3/3: exported as an official-format checkpoint"
"$BIN/head-export" --head "$OUT/run_release/head.safetensors" --out "$OUT/release"
cp "$OUT/standin_vlm/STANDIN.json" "$OUT/release/STANDIN.json"

step "caches of the stand-in release: held-out 4-camera; front-only (train + val); front-only of the blank world"
"$BIN/cache-build" --dataset "$OUT/world" --checkpoint "$OUT/release" --out "$OUT/store_val_4cam" --cameras full \
    --split val "${BUILD[@]}"
"$BIN/cache-build" --dataset "$OUT/world" --checkpoint "$OUT/release" --out "$OUT/store_front" \
    --cameras front-only "${BUILD[@]}"
"$BIN/cache-build" --dataset "$OUT/world_blank" --checkpoint "$OUT/release" --out "$OUT/store_front_blank" \
    --cameras front-only "${BUILD[@]}"
"$BIN/cache-inspect" summary "$OUT/store_front"

step "does the prefix carry the curve? ridge probe on the K/V at the image tokens, held-out clips"
"$BIN/standin-vlm" probe "$OUT/store_val_4cam" --fit-on "$OUT/store_release_4cam" --json "$OUT/probe_4cam.json"
"$BIN/standin-vlm" probe "$OUT/store_front" --json "$OUT/probe_front.json"

step "fine-tune the head on the curve-rich front-only train split (and the same on blanked images)"
"$BIN/head-train" --cache "$OUT/store_front" --out "$OUT/run_front" --steps "$FT_STEPS" --batch-size 8 \
    --warmup-steps 20 --save-every "$FT_STEPS" --log-every 20 --lr "$LR"
"$BIN/head-train" --cache "$OUT/store_front_blank" --out "$OUT/run_front_blank" --steps "$FT_STEPS" --batch-size 8 \
    --warmup-steps 20 --save-every "$FT_STEPS" --log-every 20 --lr "$LR"

step "compare on held-out clips: the stand-in release on 4 cameras vs front-only, and the fine-tuned heads"
"$BIN/head-compare" --out "$OUT/compare" \
    --cache 4-cam="$OUT/store_val_4cam" --cache front-only="$OUT/store_front" --cache blank="$OUT/store_front_blank" \
    --head "fine-tuned front-only=$OUT/run_front/head.safetensors@front-only" \
    --head "fine-tuned blank=$OUT/run_front_blank/head.safetensors@blank" \
    --runs "front-only=$OUT/run_front" --runs "blank=$OUT/run_front_blank" --runs "release (4-cam)=$OUT/run_release"

step "export the fine-tuned head as a full official checkpoint"
"$BIN/head-export" --head "$OUT/run_front/head.safetensors" --out "$OUT/export"

step "done"
printf '\nDemo done: %s/compare/{compare.md,samples.png,bins.png,loss.png}, %s/probe_{4cam,front}.json, %s/export\n' "$OUT" "$OUT" "$OUT"
