"""GPU check of the store writer's two paths on CUDA tensors (release shapes, front-only, int8):
writer processes vs threads give bitwise-equal stores, and NaN/Inf planted on the GPU are counted
in the manifest by both (the staging path counts on the device).

    python3 bench/check_store_procs_gpu.py
"""

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.store import KVSpec, Store, StoreWriter, synthetic_sample  # noqa: E402

PROV = {"checkpoint": None, "head_config_hash": None, "processor": None, "prefix_mode": "teacher",
        "dataset_revision": None, "code_version": "check"}


def on_gpu(s, i: int, bad: int):
    k, v, h = s.k.cuda(), s.v.cuda(), s.hidden.cuda()
    if bad:  # plant `bad` non-finite values: NaN in K, +Inf in V, -Inf in the hidden states
        k[0, 0, 0, 0] = float("nan")
        v[1, 0, 3, 0] = float("inf")
        h[2, 5] = float("-inf")
    return dataclasses.replace(s, key=f"s{i}@{s.t0_us}:{s.camera_config}", clip_id=f"s{i}", k=k, v=v, hidden=h)


def main() -> None:
    spec = KVSpec(36, 8, 128, 4096, "bfloat16", "int8", True, "zstd")
    base = synthetic_sample(0, spec, prefix_len=809, outliers=False)
    d = Path(tempfile.mkdtemp())
    for name, kw in (("threads", dict(workers=2)), ("processes", dict(processes=2))):
        t0 = time.perf_counter()
        with StoreWriter.create(str(d / name), PROV, spec, **kw) as w:
            w.wait_ready()
            for i in range(6):
                w.write(on_gpu(base, i, bad=i == 3))
            w.flush()
            pinned = [p._registered for p in w._procs]
        print(f"{name:9s} wrote {w.samples_written} in {time.perf_counter() - t0:.2f} s; slabs pinned: {pinned}")
    a, b = Store.open(str(d / "threads")), Store.open(str(d / "processes"))
    for key in a.keys():
        ra, rb = a.read(key), b.read(key)
        for x, y in ((ra.k, rb.k), (ra.v, rb.v), (ra.hidden, rb.hidden)):  # bit patterns: NaN != NaN
            assert torch.equal(x.view(torch.int16), y.view(torch.int16)), key
        na, nb = a.manifest(key)["nonfinite"], b.manifest(key)["nonfinite"]
        assert na == nb == (3 if key.startswith("s3@") else 0), (key, na, nb)
    print("processes == threads bitwise; NaN/Inf counted on the GPU path: 3 in s3, 0 elsewhere; verify:",
          a.verify().ok, b.verify().ok)


if __name__ == "__main__":
    main()
