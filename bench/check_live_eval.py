"""Cached vs live evaluation end to end: does the store hold what the VLM computes?

    python bench/check_live_eval.py --json docs/live_eval_h200.json            # GPU box (cuda, bf16 cache)
    python bench/check_live_eval.py --device cpu --kv-dtype float32 --json /tmp/live.json

Builds the tiny random-weight checkpoint, a small synthetic world and a store (cache-build, once per
pixel path), runs `head-eval --live N` on it (the VLM recomputes N prefixes from the raw frames), and
prints cached vs live agreement: token ids, rope deltas, K/V differences, and the metrics of
trajectories sampled with the same noise from each prefix. Writes everything as JSON to --json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_builder import cache_build  # noqa: E402
from head_trainer import head_eval  # noqa: E402
from head_trainer.live import format_table  # noqa: E402
from shared.data import write_synthetic_world  # noqa: E402
from shared.store import Store  # noqa: E402
from shared.tiny_checkpoint import write_tiny_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="write the results here")
    p.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--kv-dtype", default=None, choices=["bfloat16", "float32"],
                   help="store K/V dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--pixels", default="both", choices=["inference", "stage2", "both"], help="image path(s) to build")
    p.add_argument("--clips", type=int, default=3, help="synthetic clips")
    p.add_argument("--cameras", default="front-only", help="camera config of the store")
    p.add_argument("--live", type=int, default=4, help="samples the VLM recomputes")
    p.add_argument("--num-samples", type=int, default=6, help="trajectories per prefix")
    p.add_argument("--steps", type=int, default=10, help="Euler steps")
    a = p.parse_args(argv)
    device = "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    kv = a.kv_dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    work = Path(a.work or tempfile.mkdtemp(prefix="live_eval_"))
    t0 = time.perf_counter()
    ckpt = write_tiny_checkpoint(work / "tiny", dtype=getattr(torch, kv))
    write_synthetic_world(work / "world", n_clips=a.clips, seed=5, width=384, height=216, duration_s=12.0,
                          kinds=["sharp-left", "straight", "sharp-right", "gentle-left"][: a.clips] if a.clips <= 4 else None)
    report = {"device": device, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if
              device.startswith("cuda") else platform.processor(), "kv_dtype": kv, "runs": {}}
    for pixels in (["inference", "stage2"] if a.pixels == "both" else [a.pixels]):
        store, out = work / f"store_{pixels}", work / f"eval_{pixels}.json"
        rc = cache_build.main(["--dataset", str(work / "world"), "--checkpoint", str(ckpt), "--out", str(store),
                               "--cameras", a.cameras, "--keyframes", "stride:2", "--device", device,
                               "--kv-dtype", kv, "--pixels", pixels, "--overwrite"])
        if rc:
            return rc
        rc = head_eval.main(["--cache", str(store), "--out", str(out), "--split", "all", "--device", device,
                             "--num-samples", str(a.num_samples), "--steps", str(a.steps), "--live", str(a.live),
                             "--force"])
        if rc:
            return rc
        res = json.loads(out.read_text())
        report["runs"][pixels] = {"store_provenance_pixels": Store.open(str(store)).provenance.get("pixels"),
                                  "cache_eval_summary": res["summary"], "live": res["live"]}
        print(f"\n== pixels={pixels} ==\n{format_table(res['live'])}")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwritten {a.json} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
