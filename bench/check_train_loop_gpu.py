"""GPU checks of the head-train loop on the tiny checkpoint (the CPU suite cannot run these).

    python bench/check_train_loop_gpu.py --dir /tmp/loop --json $OUT/train_loop_gpu.json      # 1 or 2 GPUs
    python bench/check_train_loop_gpu.py --dir /tmp/loop --json /tmp/loop.json --device cpu   # smoke run (slow)

- --grad-accum 3 with CUDA graphs equals eager steps and one micro-batch of the same global batch (fp32);
- stop + resume equals an uninterrupted run, per trainable mode, with EMA, compile and CUDA graphs on;
- with 2 GPUs: `accelerate launch --num_processes 2` (NCCL) at batch 2 against 1 GPU at batch 4 (fp32);
- each run's summary.json (loader wait, peak memory).
Every result is recorded (max |diff| of the final heads), nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from train_store import write_train_store  # noqa: E402

from shared.checkpoint import load_head_file  # noqa: E402
from shared.tiny_checkpoint import write_tiny_checkpoint  # noqa: E402


def head_train(args: list[str], launcher: list[str] | None = None) -> dict:
    cmd = [*(launcher or [sys.executable]), "-m", "head_trainer.head_train", *args]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(
        x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)}, capture_output=True, text=True)
    return {"cmd": " ".join(cmd), "rc": p.returncode, "tail": (p.stdout + p.stderr)[-800:]}


def max_diff(a: Path, b: Path) -> float | None:
    if not (a.is_file() and b.is_file()):
        return None
    x, y = load_head_file(a)[0], load_head_file(b)[0]
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (no --compile)")
    ap.add_argument("--checks", default="accum,resume,ddp", help="which checks, comma-separated")
    args = ap.parse_args()
    checks = set(args.checks.split(","))
    root = Path(args.dir)
    ckpt = write_tiny_checkpoint(root / "tiny", dtype=torch.float32)
    store = write_train_store(root / "store", ckpt, n=24)
    common = ["--cache", str(store), "--steps", "12", "--warmup-steps", "2", "--save-every", "4", "--log-every", "2",
              "--val-every", "4", "--device", args.device, "--seed", "3", "--overwrite"]
    results = []
    gpu = args.device == "cuda"  # the CPU smoke run skips what compiles (torchao's 8-bit step, --compile)
    # two device K/V slots serve 3 micro-batches a step (head_trainer/feeder.py): CUDA-graph replays equal
    # eager steps, and both the one-micro-batch run at the same global batch (fp32)
    if "accum" in checks:
        accum = ["--batch-size", "2", "--grad-accum", "3"]
        for name, extra in (("graphs", accum + (["--cuda-graphs"] if gpu else [])), ("eager", accum),
                            ("b6", ["--batch-size", "6"])):
            rec = head_train([*common, "--dtype", "float32", "--out", str(root / f"accum_{name}"), *extra])
            results.append({"check": f"grad-accum run {name}", "flags": extra, **rec, "max_abs_diff": None})
        for a, b in (("graphs", "eager"), ("graphs", "b6")):
            results.append({"check": f"grad-accum 3 x B2: {a} vs {b}", "max_abs_diff": max_diff(
                root / f"accum_{a}/head.safetensors", root / f"accum_{b}/head.safetensors")})
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    modes = (("all", ["--dtype", "bfloat16", "--optimizer", "adamw8bit" if gpu else "adamw", "--cuda-graphs"]),
             ("projections", ["--compile"] if gpu else []),
             ("lora", ["--ema-decay", "0.9", "--gradient-checkpointing", "--cuda-graphs"]))
    for mode, extra in modes if "resume" in checks else ():
        flags = [*common, "--trainable", mode, "--batch-size", "4", *extra]
        full, cut = root / f"{mode}_full", root / f"{mode}_cut"
        rec = {"check": "stop+resume", "mode": mode, "flags": extra,
               "full": head_train([*flags, "--out", str(full)]),
               "cut": head_train([*flags, "--out", str(cut), "--stop-after", "6"])}
        flags.remove("--overwrite")
        rec["resume"] = head_train([*flags, "--out", str(cut), "--resume"])
        rec["max_abs_diff"] = max_diff(full / "head.safetensors", cut / "head.safetensors")
        rec["summary"] = json.loads((full / "summary.json").read_text()) if (full / "summary.json").is_file() else None
        results.append(rec)
    if gpu and torch.cuda.device_count() >= 2 and "ddp" in checks:
        flags = [*common, "--dtype", "float32"]
        one = head_train([*flags, "--batch-size", "4", "--out", str(root / "ddp_one")])
        two = head_train([*flags, "--batch-size", "2", "--out", str(root / "ddp_two")],
                         ["accelerate", "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                          "no", "--dynamo_backend", "no"])
        results.append({"check": "ddp 2 GPUs x B2 vs 1 GPU x B4", "one": one, "two": two,
                        "max_abs_diff": max_diff(root / "ddp_one/head.safetensors", root / "ddp_two/head.safetensors")})
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    for r in results:
        print(r["check"], r.get("mode", ""), "max|diff|", r["max_abs_diff"])


if __name__ == "__main__":
    main()
