"""cache-build over several GPUs under `accelerate launch`: one store, disjoint shards, nothing lost.

    python bench/bench_multi_gpu_build.py --gpus 2 --json $OUT/multi_gpu_build.json

Tiny random-weight checkpoint (release format) + a synthetic world. Reference: one process on cuda:0.
Then `accelerate launch --num_processes N --module cache_builder.cache_build --shard auto` from an empty
directory (every process creates / joins the store itself). Checks: `verify` passes, the key set equals
the reference's, every sample's K/V/hidden equal the reference bit for bit (fp32 store, batch 1), and
every process wrote its own shard. Records the wall time of both builds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.data import write_synthetic_world  # noqa: E402
from shared.store import Store  # noqa: E402
from shared.tiny_checkpoint import write_tiny_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--json", default="multi_gpu_build.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    write_tiny_checkpoint(tmp / "tiny")
    write_synthetic_world(tmp / "world", n_clips=args.clips, seed=3, width=160, height=96, duration_s=12.0)
    common = ["--dataset", str(tmp / "world"), "--checkpoint", str(tmp / "tiny" / "alpamayo"), "--kv-dtype", "float32",
              "--cameras", "front-only", "--keyframes", "stride:2", "--batch-size", "1"]
    res: dict = {"gpus": args.gpus, "devices": [torch.cuda.get_device_name(i) for i in range(args.gpus)]}

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cache_builder.cache_build", *common, "--out", str(tmp / "ref"),
                    "--device", "cuda:0"], check=True)
    res["single_process_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.gpus), "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--module", "cache_builder.cache_build",
                    *common, "--out", str(tmp / "multi"), "--shard", "auto", "--resume"], check=True)
    res["accelerate_s"] = time.perf_counter() - t0

    ref, multi = Store.open(str(tmp / "ref")), Store.open(str(tmp / "multi"))
    report = multi.verify()
    res["verify_ok"] = report.ok
    res["samples_ref"], res["samples_multi"] = len(ref), len(multi)
    res["same_keys"] = sorted(ref.keys()) == sorted(multi.keys())
    res["per_writer"] = dict(Counter(multi.manifest(k)["writer_id"] for k in multi.keys()))
    same = 0
    for key in ref.keys():
        a, b = ref.read(key), multi.read(key)
        same += int(torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and torch.equal(a.hidden, b.hidden))
    res["bitwise_equal_samples"] = same
    print(json.dumps(res, indent=2))
    Path(args.json).write_text(json.dumps(res, indent=2))
    ok = report.ok and res["same_keys"] and same == len(ref) and len(res["per_writer"]) == args.gpus
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
