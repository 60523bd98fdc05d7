#!/usr/bin/env bash
# One device call of GPU measurements for head-train (issues 9, 10, 12). Usage on the GPU box:
#   bash bench/h200_session.sh train   # step + memory + quality of the release head, tiny-checkpoint loop checks
#   bash bench/h200_session.sh train2  # the optimizers / plans the first left, bench/profile_head_step.py, graph configs
#   bash bench/h200_session.sh e2e     # release-shape stores, head-train CLI end to end, adamwfp8's update cost
#   bash bench/h200_session.sh rest    # fp8 / offload / trainable-mode memory, 200-step quality, Stage-2 reference
#   bash bench/h200_session.sh fused   # adamw8bit-fused vs torchao adamw8bit: step split, 24 GB plan rows, 200-step quality
#   bash bench/h200_session.sh e2ef    # stores, head-train end to end (E2E_OPT, default adamw8bit), Stage-2 reference
#                                        (E2E_OPT=adamw8bit-fused reproduces the H100 run of 2026-12-07)
#   bash bench/h200_session.sh modes   # memory rows of projections / lora / fp8 / offload
#   bash bench/h200_session.sh triton  # adamw8bit-fused's Triton kernel: CUDA check, update microbench, step rows, step split
#   bash bench/h200_session.sh split   # --attention split: kernel checks + tiles, step split, step rows, quality
#   bash bench/h200_session.sh final   # --grad-accum with the two-slot feeder on CUDA, the update's table-guess search
#                                        (CHECK_S, ABL_S), L = 809 memory rows, fast math's 200-step curve (QUAL_S),
#                                        B = 8 split steps with the shipped kernel (STEP0_S) and fast + table (STEP_S)
#   bash bench/h200_session.sh verify  # the fifth session's CPU-built changes on CUDA in one call (checks first, then rows)
#   bash bench/h200_session.sh fix     # run 6's fixes: fused-wgrad graphs, new update default, its checks, L = 809 rows
#   bash bench/h200_session.sh chunk   # the split kernels' CUDA check, key-chunk sweep (one-chunk path), B = 8 / L = 809 steps
#   bash bench/h200_session.sh next    # what the last session left: the kernel's CUDA checks, its fast-math variant, its 200-step curve, its
#                                        step rows (grad-accum 4 and 8), L = 809 memory rows of every optimizer / mode
# Every result lands in $OUT as JSON as soon as it is measured; each part has its own time limit so a
# hang or crash in one costs only that part.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv > "$OUT/log_main.txt" 2>&1
part() { local t=$1; shift; [ "$t" -gt 0 ] || return 0; echo "== $(date +%T) [$t s] $*" >> "$OUT/log_main.txt"; timeout -k 5 "$t" "$@" >> "$OUT/log_main.txt" 2>&1; echo "== rc=$? $(date +%T)" >> "$OUT/log_main.txt"; }
mem809() {  # issue 9's L = 809 memory rows of every optimizer (MEM_OPTS) and trainable mode
  part "$1" python3 bench/bench_head_train.py --sections memory --memory-lengths 809 \
    --optimizers "${MEM_OPTS:-adamw8bit-fused,adamwfp8,adamw4bit,adamw,adamw-sr,adamw-offload}" --json-dir "$OUT"; }
case "${1:-train}" in
train)
  # tiny-checkpoint checks in the background, overlapping memory + quality (not timed); step runs alone
  ( timeout -k 5 "${BG_S:-310}" python3 bench/check_train_loop_gpu.py --dir /tmp/loop --json "$OUT/train_loop_gpu.json" >> "$OUT/log_bg.txt" 2>&1
    echo "rc=$?" >> "$OUT/log_bg.txt" ) &
  ( timeout -k 5 "${BG_S:-310}" python3 bench/check_live_eval.py --json "$OUT/live_eval_h200.json" --work /tmp/live >> "$OUT/log_bg.txt" 2>&1
    echo "rc=$?" >> "$OUT/log_bg.txt" ) &
  part "${MEM_S:-150}" python3 bench/bench_head_train.py --sections memory --json-dir "$OUT"
  part "${QUAL_S:-150}" python3 bench/bench_head_train.py --sections quality --quality-steps "${QUAL_STEPS:-100}" --json-dir "$OUT"
  wait
  part "${STEP_S:-250}" python3 bench/bench_head_train.py --sections step --json-dir "$OUT"
  ;;
train2)  # second pass: the optimizers and plans the first left (beside the tiny checks), then profile + graphs alone
  ( timeout -k 5 "${BG_S:-260}" python3 bench/check_train_loop_gpu.py --dir /tmp/loop --json "$OUT/train_loop_gpu.json" >> "$OUT/log_bg.txt" 2>&1
    echo "rc=$?" >> "$OUT/log_bg.txt" ) &
  ( timeout -k 5 "${BG_S:-260}" python3 bench/check_live_eval.py --json "$OUT/live_eval_h200.json" --work /tmp/live >> "$OUT/log_bg.txt" 2>&1
    echo "rc=$?" >> "$OUT/log_bg.txt" ) &
  part "${MEM_S:-120}" python3 bench/bench_head_train.py --sections memory --optimizers adamw4bit,adamw-sr,adamw-offload --json-dir "$OUT"
  part "${QUAL_S:-130}" python3 bench/bench_head_train.py --sections quality --quality-steps "${QUAL_STEPS:-100}" \
    --quality-plans bfloat16:adamw4bit:graphs,bfloat16:adamw-sr:graphs --json-dir "$OUT"
  wait
  part "${PROF_S:-140}" python3 bench/profile_head_step.py --json "$OUT/head_step_profile.json"
  part "${STEP_S:-120}" python3 bench/bench_head_train.py --sections step --step-set graphs --batches 4,16 --json-dir "$OUT"
  ;;
e2e)  # release-shape stores, then head-train end to end from each (the ratio to Stage-2), then adamwfp8's update
  S=${E2E_STORES:-4cam_int8,front_bf16}; N=${E2E_N:-32}
  e() { part "$1" python3 bench/bench_head_train_e2e.py --json-dir "$OUT" --dir /tmp/stores --stores "$S" --max-samples "$N" \
          --workers 8 --e2e-steps "${E2E_STEPS:-150}" --e2e-timeout "${E2E_RUN_S:-170}" --e2e-args "${E2E_ARGS:---preset 24gb --compile --cuda-graphs --ram-cache-gb 16 --val-every 0}" --sections "$2" ${3:+--stores $3}; }
  e "${STORES_S:-100}" stores
  e "${E2E1_S:-200}" e2e 4cam_int8
  e "${E2E2_S:-160}" e2e front_bf16
  part "${PROF_S:-80}" python3 bench/profile_head_step.py --memory-cap-gib 24 --json "$OUT/head_step_profile.json" \
    --configs "${PROF_CONFIGS:-adamwfp8:8:2993,adamwfp8:8:809}"
  ;;
rest)  # what the first calls' time limits left: trainable modes / offload / fp8 memory, 200-step quality, Stage-2 + loader
  part "${MEM_S:-150}" python3 bench/bench_head_train.py --sections memory --optimizers adamwfp8,adamw-offload --json-dir "$OUT"
  part "${QUAL_S:-270}" python3 bench/bench_head_train.py --sections quality --quality-steps 200 \
    --quality-plans float32:adamw:eager,bfloat16:adamw8bit:graphs,bfloat16:adamwfp8:graphs --json-dir "$OUT"
  part "${STAGE2_S:-120}" python3 bench/bench_head_train_e2e.py --json-dir "$OUT" --dir /tmp/stores --sections stage2
  ;;
fused)
  part "${STEP_S:-220}" python3 bench/bench_head_train.py --sections step --step-set fused --json-dir "$OUT"
  part "${PROF_S:-150}" python3 bench/profile_head_step.py --memory-cap-gib 24 --json "$OUT/head_step_profile.json" \
    --configs "${PROF_CONFIGS:-adamw8bit-fused:8:2993:r,adamw8bit:8:2993:r,adamw8bit-fused:8:809:rp}"
  part "${QUAL_S:-200}" python3 bench/bench_head_train.py --sections quality --quality-steps "${QUAL_STEPS:-200}" \
    --quality-plans float32:adamw:eager,bfloat16:adamw8bit-fused:graphs,bfloat16:adamw8bit:graphs --json-dir "$OUT"
  ;;
triton)  # the Triton update kernel: correct on CUDA, its bandwidth, then the whole step against torchao's
  part "${CHECK_S:-60}" python3 bench/diag_adam8.py --check
  part "${GCHECK_S:-90}" python3 bench/check_graph_step.py
  part "${DIAG_S:-120}" python3 bench/diag_adam8.py
  part "${PROF_S:-150}" python3 bench/profile_head_step.py --memory-cap-gib 24 --json "$OUT/head_step_profile.json" \
    --configs "${PROF_CONFIGS:-adamw8bit-fused:8:2993:r,adamw8bit-fused:8:809:r,adamw8bit-fused:1:809}"
  [ "${STEP_S:-240}" -gt 0 ] && part "${STEP_S:-240}" python3 bench/bench_head_train.py --sections step --step-set fused \
    --step-optimizers adamw8bit-fused --json-dir "$OUT"
  ;;
next)
  part "${CHECK_S:-60}" python3 bench/diag_adam8.py --check
  part "${DIAG_S:-100}" python3 bench/diag_adam8.py
  part "${GCHECK_S:-90}" python3 bench/check_graph_step.py
  part "${QUAL_S:-200}" python3 bench/bench_head_train.py --sections quality --quality-steps "${QUAL_STEPS:-200}" \
    --quality-plans float32:adamw:eager,bfloat16:adamw8bit-fused:graphs --json-dir "$OUT"
  part "${STEP_S:-200}" python3 bench/bench_head_train.py --sections step --step-set fused --step-optimizers adamw8bit-fused \
    --json-dir "$OUT"
  [ "${PROF_S:-0}" -gt 0 ] && part "$PROF_S" python3 bench/profile_head_step.py --memory-cap-gib 24 --json "$OUT/prof.json" \
    --configs "${PROF_CONFIGS:-adamw8bit-fused:8:2993:rp}"
  [ "${MEM_S:-0}" -gt 0 ] && part "$MEM_S" python3 bench/bench_head_train.py --sections memory --memory-lengths 809 \
    --optimizers adamw8bit-fused,adamwfp8,adamw4bit,adamw --json-dir "$OUT"
  ;;
e2ef)  # the fused plans end to end (4 cameras: the 24gb preset's layer recompute, since two 3.3 GiB KV slots
       # plus attention recompute estimate above 90 % of 24 GiB; front-only: attention recompute); Stage-2 in the same call
  S=${E2E_STORES:-4cam_int8,front_bf16}; N=${E2E_N:-32}
  part "${ABL_S:-0}" python3 bench/diag_adam8.py --ablate --json "$OUT/adam8_ablate.json"
  A="--dtype bfloat16 --optimizer ${E2E_OPT:-adamw8bit} --gpu-memory-budget 24GiB --compile --cuda-graphs --ram-cache-gb 16 --val-every 0"
  e() { part "$1" python3 bench/bench_head_train_e2e.py --json-dir "$OUT" --dir /tmp/stores --stores "$S" --max-samples "$N" \
          --workers 8 --e2e-steps "${E2E_STEPS:-200}" --e2e-timeout "${E2E_RUN_S:-150}" --e2e-args "$4" --sections "$2" ${3:+--stores $3}; }
  e "${STORES_S:-90}" stores "" "$A"
  e "${E2E1_S:-165}" e2e 4cam_int8 "$A ${E2E1_X:---gradient-checkpointing}"
  e "${E2E2_S:-150}" e2e front_bf16 "$A ${E2E2_X:---recompute-attention}"
  part "${STAGE2_S:-150}" python3 bench/bench_head_train_e2e.py --json-dir "$OUT" --dir /tmp/stores --sections stage2
  ;;
split)  # --attention split (shared/prefix_attention.py): CUDA checks, step rows at the 24 GB plans (sdpa beside),
        # step split + kernels, tile sweep vs SDPA, 200-step quality of split + the fast-math update
  part "${CHECK_S:-60}" python3 bench/bench_prefix_attention.py --check
  part "${STEP_S:-0}" python3 bench/bench_head_train.py --sections step --step-set split --step-optimizers adamw8bit-fused \
    ${STEP_FAST:+--adam8-fast} --step-rows "${STEP_ROWS:-0}" --json-dir "$OUT"
  part "${PROF_S:-120}" python3 bench/profile_head_step.py --memory-cap-gib 24 --json "$OUT/prof.json" \
    --configs "${PROF_CONFIGS:-adamw8bit-fused:8:2993:sp}"
  part "${SWEEP_S:-150}" python3 bench/bench_prefix_attention.py --json "$OUT/prefix_attention.json" --tiles "${TILES:-10}"
  part "${QUAL_S:-0}" python3 bench/bench_head_train.py --sections quality --quality-steps "${QUAL_STEPS:-200}" --adam8-fast \
    --quality-plans bfloat16:adamw8bit-fused:graphs:split --json-dir "$OUT"
  part "${ABL_S:-0}" python3 bench/diag_adam8.py --ablate --json "$OUT/adam8_ablate.json"
  ;;
final)  # the deferred two-slot feeder under --grad-accum on CUDA (graphs vs eager vs one batch), then L = 809 memory rows
  part "${PCHECK_S:-0}" python3 bench/bench_prefix_attention.py --check  # the split kernels (one-chunk path: fifth session)
  part "${ACC_S:-80}" python3 bench/check_train_loop_gpu.py --dir /tmp/loop --json "$OUT/train_loop_gpu.json" --checks accum
  part "${CHECK_S:-0}" python3 bench/diag_adam8.py --check  # the three code searches, SEARCH 2's first CUDA run
  part "${ABL_S:-0}" python3 bench/diag_adam8.py --ablate --json "$OUT/adam8_ablate.json"
  mem809 "${MEM_S:-90}"
  part "${QUAL_S:-0}" python3 bench/bench_head_train.py --sections quality --quality-steps 200 --adam8-fast --adam8-search 2 \
    --quality-plans float32:adamw:eager,bfloat16:adamw8bit-fused:graphs:split --json-dir "$OUT"  # fast math's curve
  # B = 8, L = 2,993 split steps: the shipped kernel, then fast math + table search alone and over 8 micro-batches
  part "${STEP0_S:-0}" python3 bench/bench_head_train.py --sections step --step-set split --step-optimizers adamw8bit-fused \
    --step-pick 0 --json-dir "$OUT"
  part "${STEP_S:-0}" python3 bench/bench_head_train.py --sections step --step-set split --step-optimizers adamw8bit-fused \
    --adam8-fast --adam8-search 2 --step-pick "${STEP_PICK:-0,2}" ${PCHUNK:+--prefix-chunk $PCHUNK} --json-dir "$OUT"
  ;;
verify)  # one call for what the fifth session built without a GPU, most needed first: the changed kernels' CUDA
         # checks (split one-chunk / int8; the update's loop and table search), the fused-wgrad graphs against eager,
         # --grad-accum on CUDA, the update ablation, B = 8 steps (plain, fused-wgrad), L = 809 memory rows (issue 9)
  part "${PCHECK_S:-40}" python3 bench/bench_prefix_attention.py --check
  part "${CHECK_S:-45}" python3 bench/diag_adam8.py --check
  part "${GCHECK_S:-70}" python3 bench/check_graph_step.py
  part "${ACC_S:-60}" python3 bench/check_train_loop_gpu.py --dir /tmp/loop --json "$OUT/train_loop_gpu.json" --checks accum
  part "${ABL_S:-70}" python3 bench/diag_adam8.py --ablate --json "$OUT/adam8_ablate.json"
  part "${STEP_S:-130}" python3 bench/bench_head_train.py --sections step --step-set split --step-optimizers adamw8bit-fused \
    --step-pick "${STEP_PICK:-0,8}" ${ADAM8_X:-} --json-dir "$OUT"
  mem809 "${MEM_S:-110}"
  ;;
chunk)  # the split kernels' key chunks (one chunk per program from 1,024 keys at L = 809 and 3,072 at L = 2,993: no
        # merge kernels), then B = 8 steps at the chunk PCHUNK beside the default
  part "${PCHECK_S:-40}" python3 bench/bench_prefix_attention.py --check
  part "${SWEEP_S:-120}" python3 bench/bench_prefix_attention.py --json "$OUT/prefix_attention.json" --tiles "${TILES:-4}"
  part "${STEP_S:-200}" python3 bench/bench_head_train.py --sections step --step-set split --step-optimizers adamw8bit-fused \
    --step-pick "${STEP_PICK:-0,3}" ${ADAM8_X:-} --json-dir "$OUT"  # ADAM8_X="--adam8-fast --adam8-search 2": that kernel
  [ -n "${PCHUNK:-}" ] && part "${STEP2_S:-150}" python3 bench/bench_head_train.py --sections step --step-set split \
    --step-optimizers adamw8bit-fused --step-pick "${STEP_PICK:-0,3}" --prefix-chunk "$PCHUNK" ${ADAM8_X:-} --json-dir "$OUT"
  ;;
fix)  # run 6's fixes: --fused-wgrad under CUDA graphs, B = 8 steps with the new update default (table search, one
      # warp), the update's layouts / searches bitwise on CUDA, its ablation, the L = 809 rows run 6 did not reach
  part "${GCHECK_S:-70}" python3 bench/check_graph_step.py
  part "${STEP_S:-170}" python3 bench/bench_head_train.py --sections step --step-set split --step-optimizers adamw8bit-fused \
    --step-pick "${STEP_PICK:-0,8,9}" ${ADAM8_X:-} --json-dir "$OUT"
  part "${CHECK_S:-40}" python3 bench/diag_adam8.py --check
  part "${ABL_S:-40}" python3 bench/diag_adam8.py --ablate --json "$OUT/adam8_ablate.json"
  MEM_OPTS=${MEM_OPTS:-adamw,adamw-sr,adamw-offload} mem809 "${MEM_S:-80}"
  ;;
modes)
  part "${MEM_S:-200}" python3 bench/bench_head_train.py --sections memory --optimizers adamwfp8,adamw-offload --json-dir "$OUT"
  ;;
esac
rm -f "$OUT/head_train_env.json"  # at most 8 files come back
exit 0
