"""What the read-side integrity checks cost: Store.read() with and without the crc32 of each array.

Realistic sample: Qwen3-VL-8B shapes (36 layers x 8 kv heads x 128, hidden 4096), L=800, bf16, zstd-1,
warm page cache. The file checks (every listed file present with its recorded size) are always on and
cost nothing measurable (a length compare per file read); the crc32 is the opt-out (`checksums=False`).

    PYTHONPATH=. python bench/bench_read_checks.py [--samples 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import zlib

import numpy as np

from shared.store import KVSpec, Store, StoreWriter, synthetic_sample

PROV = dict(checkpoint="bench", head_config_hash=None, processor=None, prefix_mode="teacher", dataset_revision=None,
            code_version="bench")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefix-len", type=int, default=800)
    a = ap.parse_args()
    spec = KVSpec(num_layers=36, num_kv_heads=8, head_dim=128, hidden_size=4096)
    with tempfile.TemporaryDirectory() as d:
        with StoreWriter.create(d + "/c", PROV, spec) as w:
            for i in range(a.samples):
                w.write(synthetic_sample(i, spec, prefix_len=a.prefix_len))
        mb = (2 * 36 * 8 * a.prefix_len * 128 * 2 + a.prefix_len * 4096 * 2) / 1e6
        res = {}
        for on in (False, True, False, True):  # interleaved: drifting load hits both alike
            st = Store.open(d + "/c", checksums=on)
            for _ in range(a.repeats):
                for i in range(len(st)):
                    t = time.perf_counter()
                    st.read(i)
                    res.setdefault(on, []).append(time.perf_counter() - t)
        st = Store.open(d + "/c", checksums=False)
        arrays = [st.read_stored(0, n) for n in st.manifest(0)["arrays"]]
        crc_s = []
        for _ in range(a.repeats * a.samples):
            t = time.perf_counter()
            for x in arrays:
                zlib.crc32(memoryview(np.ascontiguousarray(x)).cast("B"))
            crc_s.append(time.perf_counter() - t)
        crc = statistics.median(crc_s)
        stored_mb = sum(x.nbytes for x in arrays) / 1e6
    off, on = statistics.median(res[False]), statistics.median(res[True])
    print(f"sample: {mb:.1f} MB logical (K/V + hidden), L={a.prefix_len}; median of {len(res[True])} reads")
    print(f"read() checksums=False: {off * 1e3:7.1f} ms  ({mb / off:6.0f} MB/s)")
    print(f"read() checksums=True : {on * 1e3:7.1f} ms  ({mb / on:6.0f} MB/s)  +{(on / off - 1) * 100:.0f} %")
    print(f"crc32 of one sample's stored arrays alone ({stored_mb:.1f} MB): {crc * 1e3:.1f} ms "
          f"({stored_mb / crc / 1e3:.2f} GB/s) = {crc / off * 100:.0f} % of a read without it")


if __name__ == "__main__":
    main()
