"""Where the CUDA-graph step of the release head spends its time (GPU): forward+backward vs clip+update.

    python bench/profile_head_step.py --json $OUT/head_step_profile.json          # on the GPU box

Per optimizer and shape: the captured forward+backward graph and the captured clip+update graph are
replayed alone (CUDA-event medians), next to the whole step; then one eager step under
torch.profiler gives the kernels that take the most GPU time. Random weights, release shapes.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_head_train import Timer, adam8_variant, build_head, free, head_config, random_batch, use_adam8_fast  # noqa: E402

from head_trainer.optim import build_optimizer  # noqa: E402
from head_trainer.step import StepConfig, TrainStep  # noqa: E402


def cuda_ms(fn, n: int = 10) -> float:
    """Median CUDA-event time of `fn` in ms (bench_head_train's Timer)."""
    return round(1e3 * statistics.median(Timer(torch.device("cuda"))(fn, n)), 2)


def top_kernels(fn, k: int = 20) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows.append({"name": e.key[:120], "calls": e.count, "ms": round(t / 1e3, 2)})
    rows.sort(key=lambda r: -r["ms"])
    return [{"total_ms": round(sum(r["ms"] for r in rows), 2), "kernels": len(rows)}, *rows[:k]]


def one(head, cfg, bsz: int, L: int, optimizer: str, draws: int, checkpoint: bool, profile: bool,
        recompute_attention: bool = False, attention: str = "sdpa") -> dict:
    rec = {"B": bsz, "L": L, "optimizer": optimizer, "draws": draws, "checkpoint": checkpoint,
           "recompute_attention": recompute_attention}
    if attention != "sdpa":
        rec["attention"] = attention
    if optimizer == "adamw8bit-fused":
        adam8_variant(rec)
    params = [p for p in head.parameters() if p.requires_grad]
    batch = random_batch(cfg, bsz, L, "cuda")
    opt = build_optimizer(params, optimizer, 1e-5, capturable=True)
    ts = TrainStep(head, params, opt, StepConfig(seed=1, draws=draws, compile=True, cuda_graphs=True,
                                                   checkpoint=checkpoint, recompute_attention=recompute_attention,
                                                   attention=attention))
    s = [0]

    def step():
        ts([batch], 1e-5, s[0])
        s[0] += 1

    mem = []
    for _ in range(4):  # 2 eager steps, then the capture step, then a replay
        step()
        torch.cuda.synchronize()
        mem.append((round(torch.cuda.memory_allocated() / 2**30, 2), round(torch.cuda.max_memory_allocated() / 2**30, 2),
                    round(torch.cuda.memory_reserved() / 2**30, 2)))
    rec["after_each_warm_step_alloc_peak_reserved_gib"] = mem
    g, _st = next(iter(ts._fb.values()))
    rec["step_ms"] = cuda_ms(step)
    rec["fwd_bwd_graph_ms"] = cuda_ms(g.replay)
    rec["clip_update_graph_ms"] = cuda_ms(ts._opt_graph.replay)
    rec["zero_grads_ms"] = cuda_ms(lambda: torch._foreach_zero_([p.grad for p in params]))
    rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if profile:  # an eager step with the same compiled layer: kernel time without the graph
        eager = TrainStep(head, params, opt, StepConfig(seed=1, draws=draws, compile=True, checkpoint=checkpoint,
                                                        recompute_attention=recompute_attention, attention=attention))
        eager([batch], 1e-5, 0)
        rec["eager_step_ms"] = cuda_ms(lambda: eager([batch], 1e-5, 1), 3)
        rec["eager_kernels"] = top_kernels(lambda: eager([batch], 1e-5, 2))
    print(json.dumps({k: v for k, v in rec.items() if k != "eager_kernels"}), flush=True)
    for r in rec.get("eager_kernels", []):
        print("   ", r, flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--configs", default="adamw8bit:8:809:p,adamw:8:809,adamw4bit:8:809,adamw8bit:1:809,adamw8bit:8:2993",
                    help="optimizer:B:L[:flags] (flags: p = also profile an eager step, r = --recompute-attention, "
                    "s = --attention split)")
    ap.add_argument("--adam8-fast", action="store_true", help="adamw8bit-fused's fast-math kernel variant")
    ap.add_argument("--memory-cap-gib", type=float, default=0)
    ap.add_argument("--memory-snapshot", default=None,
                    help="write torch.cuda.memory's allocation history (a pickle for pytorch.org/memory_viz) here")
    args = ap.parse_args()
    if args.memory_snapshot:  # who holds what at the peak: eager blocks, the graph pool, optimizer temporaries
        torch.cuda.memory._record_memory_history(max_entries=50_000)
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.memory_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total))
    if args.adam8_fast:
        use_adam8_fast()
    cfg = head_config(False)
    head = build_head(cfg, "cuda", torch.bfloat16)
    out = []
    for c in args.configs.split(","):
        opt, b, L, *flag = c.split(":")
        flags = flag[0] if flag else ""
        try:
            out.append(one(head, cfg, int(b), int(L), opt, 1, False, "p" in flags, "r" in flags,
                           "split" if "s" in flags else "sdpa"))
        except Exception as exc:
            out.append({"config": c, "error": f"{type(exc).__name__}: {exc}"[:300], "trace": traceback.format_exc()[-1200:]})
            print(out[-1], flush=True)
        for p in head.parameters():
            p.grad = None
        gc.collect()
        free(torch.device("cuda"))
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        if args.memory_snapshot:
            torch.cuda.memory._dump_snapshot(args.memory_snapshot)


if __name__ == "__main__":
    main()
