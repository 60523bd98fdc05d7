"""CUDA-graph steps against eager steps on a tiny head (GPU; the CPU suite cannot capture graphs).

    python bench/check_graph_step.py            # on the GPU box; prints a table, exits 1 on a mismatch

Two TrainSteps from the same weights see the same batches (two shapes, so two captured graphs share the
gradient buffers) for 6 steps: one eager, one with --cuda-graphs (2 eager warm-up steps, then
replays). fp32 weights and torch AdamW, so both must agree to float rounding; for --grad-accum 1 (the
gradient copied into the static buffer by the post-accumulate hook) and 2 (added after one zeroing),
with and without --compile; LoRA; and --fused-wgrad (the expert's weight GEMMs filling those buffers).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_head_train import build_head, head_config, random_batch  # noqa: E402

from head_trainer.optim import build_optimizer  # noqa: E402
from head_trainer.step import StepConfig, TrainStep  # noqa: E402
from head_trainer.trainable import apply_trainable  # noqa: E402


def run(head, graphs: bool, accum: int, compile: bool, batches, mode: str = "all",
        fused: bool = False) -> tuple[torch.nn.Module, list[float]]:
    head = copy.deepcopy(head)
    params = apply_trainable(head, mode)
    opt = build_optimizer(params, "adamw", 1e-3, capturable=graphs)
    ts = TrainStep(head, params, opt, StepConfig(seed=3, grad_accum=accum, compile=compile, cuda_graphs=graphs,
                                                 fused_wgrad=fused))
    losses = []
    for step, micro in enumerate(batches):
        losses.append(float(ts(micro, 1e-3, step).loss))
    return head, losses


def main() -> int:
    cfg = head_config(True)
    head = build_head(cfg, torch.device("cuda"), torch.float32)
    bad = 0
    print("| trainable | grad accum | compile | fused wgrad | max |param diff| | max |loss diff| |\n"
          "| --- | --- | --- | --- | --- | --- |")
    # fused wgrad: the GEMMs fill the buffers, graphs against eager with both fused
    for mode, accum, compile, fused in [("all", a, c, False) for a in (1, 2) for c in (False, True)] + [
            ("lora", 1, False, False), ("lora", 1, True, False), ("all", 1, True, True), ("all", 2, True, True)]:
        # two prefix lengths alternate: two fb graphs write the same gradient buffers
        batches = [[random_batch(cfg, 2, 24 if (s + m) % 2 else 40, "cuda", seed=10 * s + m, dtype=torch.float32)
                    for m in range(accum)] for s in range(6)]
        try:
            a, la = run(head, False, accum, compile, batches, mode, fused)
            b, lb = run(head, True, accum, compile, batches, mode, fused)
        except Exception as exc:  # noqa: BLE001 - report the row and go on
            import traceback

            traceback.print_exc()
            print(f"| {mode} | {accum} | {compile} | {fused} | {type(exc).__name__}: {str(exc)[:80]} | |", flush=True)
            bad += 1
            continue
        dp = max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))
        dl = max(abs(x - y) for x, y in zip(la, lb))
        bad += dp > 1e-5 or dl > 1e-5
        print(f"| {mode} | {accum} | {compile} | {fused} | {dp:.2e} | {dl:.2e} |", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
